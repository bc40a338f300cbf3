"""Policy losses (PPO-clip, GSPO, CISPO, REINFORCE), registered by name, and `policy_loss` with its metrics."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from ._common import (
    LOG_RATIO_CLAMP,
    _as_mask,
    _check_options,
    _check_shape,
    _check_values,
    _lookup,
    resolve_function,
    _supported_kwargs,
    _zero_outside,
)
from .aggregation import AGG_MODES, aggregate
from .masked import masked_mean

PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]

POLICY_LOSSES: dict[str, PolicyLossFn] = {}

_POLICY_CORE_ARGS = frozenset({"logprobs", "old_logprobs", "advantages", "response_mask"})
_CLIP_ARGS = frozenset({"clip_low", "clip_high", "dual_clip"})


def register_policy_loss(name: str, *, override: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register `fn(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, dual_clip, **own)`.

    The function declares only the keyword arguments it uses and returns `(loss_mat, token_stats)`:
    the per-token loss `[B, T]` to be minimised and a dict of per-token `[B, T]` statistics (bool or float,
    e.g. `clip_frac_low`) that `policy_loss` averages over the response tokens into its metrics. Inputs arrive
    already zeroed outside `response_mask`; build ratios with `importance_log_ratio`.
    """

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES and not override:
            raise ValueError(f"policy loss {name!r} is already registered (pass override=True to replace it)")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def importance_log_ratio(logprobs: Tensor, old_logprobs: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """log r_t = clamp(log pi(a_t) - log pi_old(a_t), -c, c), so exp(log r_t) cannot overflow (c = 20 by default).

    The importance ratio of PPO (Schulman et al., 2017), taken in log space.
    """
    return (logprobs - old_logprobs).clamp(-clamp, clamp)


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
                       dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {
        "clip_frac_low": (ratio < 1.0 - clip_low) & (advantages < 0),
        "clip_frac_high": (ratio > 1.0 + clip_high) & (advantages > 0),
    }
    if dual_clip is not None:
        bound = -advantages * dual_clip
        use_bound = (advantages < 0) & (loss > bound)
        loss = torch.where(use_bound, bound, loss)
        stats["clip_frac_dual"] = use_bound
    return loss, stats


@register_policy_loss("ppo")
def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *,
                    clip_low: float, clip_high: float, dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip: l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)), then min(l_t, -c A_t) if A_t < 0.

    Schulman et al., 2017, "Proximal Policy Optimization Algorithms"; separate eps_low/eps_high is DAPO's
    clip-higher (Yu et al., 2025); the dual clip c > 1 is from Ye et al., 2020, "Mastering Complex Control
    in MOBA Games with Deep Reinforcement Learning".
    """
    ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs))
    return _clipped_surrogate(ratio, advantages, clip_low, clip_high, dual_clip)


@register_policy_loss("gspo")
def gspo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *,
                     clip_low: float, clip_high: float, dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: s_i = exp(1/|o_i| sum_t log r_it); l_it = max(-A_it s_it, -A_it clip(s_it, 1 - eps_low, 1 + eps_high)).

    Zheng et al., 2025, "Group Sequence Policy Optimization" (GSPO-token form: s_it = sg[s_i] * pi(o_it) /
    sg[pi(o_it)], equal in value to s_i, with a per-token gradient). Use with `seq-mean-token-mean` for the
    paper's objective; its clip ranges are tiny (3e-4 / 4e-4).
    """
    token_log_ratio = _zero_outside(logprobs - old_logprobs, response_mask)
    sequence_log_ratio = (token_log_ratio.sum(-1) / response_mask.sum(-1).clamp(min=1)).detach()
    log_ratio = sequence_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[:, None] + logprobs - logprobs.detach()
    return _clipped_surrogate(torch.exp(log_ratio), advantages, clip_low, clip_high, dual_clip)


@register_policy_loss("cispo")
def cispo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor, *,
                      clip_low: float, clip_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: l_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A_t * log pi(a_t) (every token keeps a gradient).

    MiniMax, 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention" (CISPO).
    """
    ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs))
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    stats = {"clip_frac_low": ratio < 1.0 - clip_low, "clip_frac_high": ratio > 1.0 + clip_high}
    return -weight * advantages * logprobs, stats


@register_policy_loss("reinforce")
def reinforce_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                          response_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE: l_t = -A_t * log pi(a_t), no importance ratio (exact only on-policy).

    Williams, 1992, "Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning".
    """
    return -advantages * logprobs, {}


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not 0.0 <= clip_low <= 1.0:
        raise ValueError(f"clip_low must be in [0, 1] (the ratio's lower bound is 1 - clip_low), got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")


def policy_loss(kind: str, logprobs: Tensor, old_logprobs: Tensor | None, advantages: Tensor,
                response_mask: Tensor, clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None,
                agg: str = "token-mean", token_weights: Tensor | None = None,
                **options: object) -> tuple[Tensor, dict[str, float]]:
    """The policy loss `kind` (ppo | gspo | cispo | reinforce | registered | `module:function` | `file.py:function`),
    aggregated with `agg`.

    Returns `(loss, metrics)`: `loss` a 0-dim tensor to minimise; `metrics` python floats: the ratio statistics
    of every loss, `approx_kl` (Schulman's k3 estimate of KL(pi_old || pi): mean of r - 1 - log r),
    `ratio_mean`, `ratio_max`, `ratio_min`, and the loss's own token statistics averaged over the response
    tokens, only those it returns: `clip_frac_low`, `clip_frac_high` (ppo, gspo: tokens whose clipping removed
    the gradient; cispo: whose weight was clipped), `clip_frac_dual` (when dual clipping is on).
    `old_logprobs=None` means exactly on-policy (old = logprobs.detach()). `token_weights` ([B, T], detached)
    multiply the per-token loss before aggregation: loss = agg(w_t * l_t), e.g. the rollout-correction
    weights of `rollout_correction_weights`. Options: `normalizer=` (see `loss_normalizer`) and any option a
    registered loss declares.
    """
    fn = resolve_function(POLICY_LOSSES, kind, "policy loss")
    _lookup(AGG_MODES, agg, "aggregation mode")
    normalizer = options.pop("normalizer", None)
    _check_options(options, POLICY_LOSSES, fn, "policy loss", _POLICY_CORE_ARGS | _CLIP_ARGS)
    _check_clip(clip_low, clip_high, dual_clip)
    declared = inspect.signature(fn).parameters
    if dual_clip is not None and "dual_clip" not in declared:
        raise ValueError(f"dual_clip applies to clipped-surrogate losses (ppo, gspo), not to {kind!r}")
    mask = _as_mask(response_mask)
    _check_shape("logprobs", logprobs, mask.shape)
    _check_shape("advantages", advantages, mask.shape)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    _check_shape("old_logprobs", old_logprobs, mask.shape)
    _check_values("logprobs", logprobs.detach(), mask)
    _check_values("old_logprobs", old_logprobs, mask, allow_inf=True)
    _check_values("advantages", advantages, mask)

    logprobs = _zero_outside(logprobs, mask)
    old_logprobs = _zero_outside(old_logprobs.to(logprobs.dtype), mask)
    advantages = _zero_outside(advantages.to(logprobs.dtype).detach(), mask)
    call = {"clip_low": clip_low, "clip_high": clip_high, "dual_clip": dual_clip, **options}
    loss_mat, token_stats = fn(logprobs, old_logprobs, advantages, mask, **_supported_kwargs(fn, call))
    if token_weights is not None:
        _check_shape("token_weights", token_weights, mask.shape)
        _check_values("token_weights", token_weights, mask)
        loss_mat = loss_mat * _zero_outside(token_weights.detach().to(loss_mat.dtype), mask)
    loss = aggregate(loss_mat, mask, agg, normalizer)

    with torch.no_grad():
        log_ratio = importance_log_ratio(logprobs.detach(), old_logprobs)
        ratio = torch.exp(log_ratio)
        has_tokens = bool(mask.any())
        metrics = {
            "approx_kl": float(masked_mean(ratio - 1.0 - log_ratio, mask)),
            "ratio_mean": float(masked_mean(ratio, mask)) if has_tokens else 1.0,
            "ratio_max": float(ratio[mask].max()) if has_tokens else 1.0,
            "ratio_min": float(ratio[mask].min()) if has_tokens else 1.0,
        }
        for name, stat in token_stats.items():
            metrics[name] = float(masked_mean(stat.to(ratio.dtype), mask))
    return loss, metrics
