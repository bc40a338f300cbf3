"""Rollout/training mismatch: how far the sampler's log-probs are from the trainer's, and its correction.

A fast sampler (vLLM: other kernels, bf16, another attention) does not compute exactly the trainer's
distribution, so even "on-policy" samples come from a slightly different policy pi_rollout than the pi_old
the trainer evaluates. Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training" (fengyao.notion.site/off-policy-rl), correct the policy gradient with the importance ratio
rho_t = pi_old(y_t) / pi_rollout(y_t), truncated at a cap C (truncated importance sampling, TIS). Sequences
whose whole-sequence ratio is an outlier can be dropped instead (rejection sampling; Liu, Li et al. 2025,
"When Speed Kills Stability"). The setting names follow veRL's `algorithm.rollout_correction`
(`rollout_is`, `rollout_is_threshold`, `rollout_rs`, `rollout_rs_threshold`, `rollout_rs_threshold_lower`);
a rejected sequence gets weight 0 but stays in the loss normaliser, as TRL's `sequence_mask` mode does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import LOG_RATIO_CLAMP, _as_mask, _check_shape, _zero_outside
from .masked import masked_mean

ROLLOUT_IS_LEVELS = (None, "token")
ROLLOUT_RS_LEVELS = (None, "sequence")


def rollout_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """log rho_t = clamp(log pi_old(y_t) - log pi_rollout(y_t), -20, 20) on response tokens, 0 elsewhere."""
    mask = _as_mask(response_mask)
    _check_shape("old_logprobs", old_logprobs, mask.shape)
    _check_shape("rollout_logprobs", rollout_logprobs, mask.shape)
    old = _zero_outside(old_logprobs.detach().double(), mask)
    rollout = _zero_outside(rollout_logprobs.detach().double(), mask)
    return (old - rollout).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def rollout_mismatch_metrics(old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> dict[str, float]:
    """How far the sampler is from the trainer, over response tokens (samples y_t ~ pi_rollout).

    `mismatch_kl` = mean_t (rho_t - 1 - log rho_t): Schulman's k3 estimate of KL(pi_rollout || pi_old), >= 0
    and 0 only when every rho_t = 1; `mismatch_k1` = mean_t (-log rho_t), the plain estimate of the same KL;
    `is_ratio_min/mean/max` = the range of rho_t; `logprob_diff_max` = max_t |log rho_t|.
    """
    mask = _as_mask(response_mask)
    log_ratio = rollout_log_ratio(old_logprobs, rollout_logprobs, mask)
    if not bool(mask.any()):
        return {"mismatch_kl": 0.0, "mismatch_k1": 0.0, "is_ratio_min": 1.0, "is_ratio_mean": 1.0,
                "is_ratio_max": 1.0, "logprob_diff_max": 0.0}
    ratio = torch.exp(log_ratio)
    return {
        "mismatch_kl": float(masked_mean(ratio - 1.0 - log_ratio, mask)),
        "mismatch_k1": float(masked_mean(-log_ratio, mask)),
        "is_ratio_min": float(ratio[mask].min()),
        "is_ratio_mean": float(masked_mean(ratio, mask)),
        "is_ratio_max": float(ratio[mask].max()),
        "logprob_diff_max": float(log_ratio[mask].abs().max()),
    }


def rollout_correction_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    *,
    rollout_is: str | None = "token",
    rollout_is_threshold: float = 2.0,
    rollout_rs: str | None = None,
    rollout_rs_threshold: float | None = None,
    rollout_rs_threshold_lower: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Per-token weights for the policy loss: w_t = min(rho_t, C) * 1[C_low <= prod_s rho_s <= C_high].

    Token-level TIS (Yao et al. 2025) with `rollout_is="token"`: w_t = min(rho_t, C), C = `rollout_is_threshold`.
    Sequence-level rejection with `rollout_rs="sequence"`: a sequence whose ratio prod_t rho_t (over its response
    tokens) lies outside [C_low, C_high] gets w = 0 on every token; C_high = `rollout_rs_threshold` (default C),
    C_low = `rollout_rs_threshold_lower` (default 1 / C_high). Weights are detached, 0 outside the mask, and
    multiply the per-token loss before aggregation (`policy_loss(..., token_weights=w)`). Returns `(w, metrics)`
    with `is_truncated_frac` (tokens whose ratio was capped), `rs_masked_frac` (sequences rejected, among
    those with response tokens) and `weight_mean` (the mean weight over response tokens).
    """
    if rollout_is not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"rollout_is must be one of {ROLLOUT_IS_LEVELS}, got {rollout_is!r}")
    if rollout_rs not in ROLLOUT_RS_LEVELS:
        raise ValueError(f"rollout_rs must be one of {ROLLOUT_RS_LEVELS}, got {rollout_rs!r}")
    if not rollout_is_threshold > 0:
        raise ValueError(f"rollout_is_threshold must be > 0, got {rollout_is_threshold}")
    mask = _as_mask(response_mask)
    log_ratio = rollout_log_ratio(old_logprobs, rollout_logprobs, mask)
    dtype = old_logprobs.dtype if old_logprobs.is_floating_point() else torch.float32
    weights = mask.to(torch.float64)
    metrics = {"is_truncated_frac": 0.0, "rs_masked_frac": 0.0, "weight_mean": 1.0}
    if rollout_is == "token":
        ratio = torch.exp(log_ratio)
        weights = torch.where(mask, ratio.clamp(max=rollout_is_threshold), 0.0)
        if bool(mask.any()):
            metrics["is_truncated_frac"] = float((ratio[mask] > rollout_is_threshold).double().mean())
    if rollout_rs == "sequence":
        high = rollout_rs_threshold if rollout_rs_threshold is not None else rollout_is_threshold
        low = rollout_rs_threshold_lower if rollout_rs_threshold_lower is not None else 1.0 / high
        if not 0 < low <= high:
            raise ValueError(f"rollout_rs thresholds must satisfy 0 < lower <= upper, got {low} and {high}")
        sequence_log_ratio = log_ratio.sum(-1)
        keep = (sequence_log_ratio >= torch.log(torch.tensor(low, dtype=torch.float64))) & (
            sequence_log_ratio <= torch.log(torch.tensor(high, dtype=torch.float64))
        )
        weights = weights * keep[:, None]
        rows = mask.any(-1)
        if bool(rows.any()):
            metrics["rs_masked_frac"] = float((~keep[rows]).double().mean())
    if bool(mask.any()):
        metrics["weight_mean"] = float(weights[mask].mean())
    return weights.to(dtype).detach(), metrics
