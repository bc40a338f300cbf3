"""The critic's clipped value loss (PPO)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _as_mask, _check_shape, _check_values, _lookup, _zero_outside
from .aggregation import AGG_MODES, Normalizer, aggregate
from .masked import masked_mean


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip: float | None = 0.5,
               agg: str = "token-mean", normalizer: Normalizer = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss: l_t = 1/2 * max((V_t - R_t)^2, (clip(V_t, V_old,t - c, V_old,t + c) - R_t)^2).

    PPO (Schulman et al., 2017) with the value clipping of OpenAI Baselines' PPO2 (studied in Engstrom et al.,
    2020, "Implementation Matters in Deep Policy Gradients"). `clip=None` gives the plain 1/2 (V - R)^2.
    Returns `(loss, metrics)` with `vf_clip_frac` (tokens where the clipped term was larger) and `value_mean`.
    """
    _lookup(AGG_MODES, agg, "aggregation mode")
    mask = _as_mask(response_mask)
    for name, x in (("values", values), ("old_values", old_values), ("returns", returns)):
        _check_shape(name, x, mask.shape)
        _check_values(name, x.detach(), mask)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 (or None), got {clip}")
    values = _zero_outside(values, mask)
    old_values = _zero_outside(old_values.to(values.dtype), mask).detach()
    returns = _zero_outside(returns.to(values.dtype), mask).detach()
    unclipped = (values - returns) ** 2
    if clip is None:
        loss_mat = 0.5 * unclipped
        clipped_more = torch.zeros_like(mask)
    else:
        # clamping V itself (not V_old + clamp(V - V_old)) keeps an unclipped token's value bit-for-bit V, so
        # rounding cannot make its clipped term the larger one and count it in vf_clip_frac
        clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
        clipped = (clipped_values - returns) ** 2
        loss_mat = 0.5 * torch.maximum(unclipped, clipped)
        clipped_more = clipped > unclipped
    loss = aggregate(loss_mat, mask, agg, normalizer)
    with torch.no_grad():
        metrics = {
            "vf_clip_frac": float(masked_mean(clipped_more.to(values.dtype), mask)),
            "value_mean": float(masked_mean(values.detach(), mask)),
        }
    return loss, metrics
