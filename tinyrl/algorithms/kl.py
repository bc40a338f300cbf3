"""KL estimators (k1, k2, k3, abs), the KL loss term and KL-shaped rewards."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._common import LOG_RATIO_CLAMP, _as_mask, _check_shape, _check_values, _lookup, _zero_outside
from .aggregation import Normalizer, aggregate
from .rewards import token_rewards_from_outcome

# Bound on the log-ratio (and on the result) of the k3 estimator, whose exp(-log_ratio) term explodes first.
KL_LOG_RATIO_CLAMP = 10.0

KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {}


def _kl_k1(log_ratio: Tensor) -> Tensor:
    """k1 = log(pi/pi_ref): unbiased, high variance, can be negative. Schulman, 2020, "Approximating KL Divergence"."""
    return log_ratio


def _kl_abs(log_ratio: Tensor) -> Tensor:
    """abs = |log(pi/pi_ref)|: a non-negative variant of k1 (after Schulman, 2020, "Approximating KL Divergence")."""
    return log_ratio.abs()


def _kl_k2(log_ratio: Tensor) -> Tensor:
    """k2 = 1/2 * (log(pi/pi_ref))^2: biased, low variance, >= 0. Schulman, 2020, "Approximating KL Divergence"."""
    return 0.5 * log_ratio**2


def _kl_k3(log_ratio: Tensor) -> Tensor:
    """k3 = pi_ref/pi - 1 - log(pi_ref/pi), log-ratio clamped to [-10, 10], result to [0, 10]. Schulman, 2020.

    Unbiased and low-variance; written with expm1 and clamped at 0 so rounding cannot make it negative.
    """
    neg = -log_ratio.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
    return (torch.expm1(neg) - neg).clamp(0.0, KL_LOG_RATIO_CLAMP)


KL_ESTIMATORS.update({"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3, "abs": _kl_abs})


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str, *, response_mask: Tensor | None = None) -> Tensor:
    """Per-token estimate `[B, T]` of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    Schulman, 2020, "Approximating KL Divergence": with x = log(pi/pi_ref), k1 = x, k2 = x^2 / 2,
    k3 = exp(-x) - 1 + x (log-ratio clamped to [-10, 10], result to [0, 10]), abs = |x|. The log-ratio of k1, k2 and
    abs is clamped to [-20, 20] so +-inf inputs stay finite. With `response_mask`, positions outside it are 0
    whatever they hold; NaN anywhere that counts raises `ValueError`.
    """
    fn = _lookup(KL_ESTIMATORS, kind, "KL estimator")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    if response_mask is None:
        mask = torch.ones(logprobs.shape, dtype=torch.bool, device=logprobs.device)
    else:
        mask = _as_mask(response_mask)
        _check_shape("logprobs", logprobs, mask.shape)
    _check_values("logprobs", logprobs.detach(), mask, allow_inf=True)
    _check_values("ref_logprobs", ref_logprobs, mask, allow_inf=True)
    logprobs = _zero_outside(logprobs, mask)
    ref_logprobs = _zero_outside(ref_logprobs.to(logprobs.dtype), mask)
    log_ratio = logprobs - ref_logprobs
    # inf - inf would be NaN; both infinite means both policies give the token the same (zero) probability.
    log_ratio = torch.where(torch.isnan(log_ratio), torch.zeros_like(log_ratio), log_ratio)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return _zero_outside(fn(log_ratio), mask)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, kind: str, kl_coef: float,
            agg: str = "token-mean", normalizer: Normalizer = None) -> Tensor:
    """KL loss term: L_KL = +beta * agg(KL_t(pi || pi_ref)), ADDED to the loss being minimised.

    Shao et al., 2024, "DeepSeekMath" (GRPO's KL term, k3 estimator). The sign matters: subtracting it
    would reward drifting away from the reference.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    per_token = kl_penalty(logprobs, ref_logprobs, kind, response_mask=response_mask)
    return kl_coef * aggregate(per_token, response_mask, agg, normalizer)


def kl_shaped_rewards(rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor,
                      kl_coef: float, kind: str = "k1") -> Tensor:
    """Token rewards with the KL penalty folded in: r'_t = r_t - beta * KL_t(pi_old || pi_ref), `[B, T]`.

    Ouyang et al., 2022, "Training language models to follow instructions with human feedback" (per-token KL
    penalty in the reward; used by PPO in TinyZero and by REINFORCE++). `rewards` is `[B]` (placed on the last
    response token) or `[B, T]`. Pass the rollout-time log-probs; the result carries no gradient.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = _as_mask(response_mask)
    if rewards.dim() == 1:
        token_rewards = token_rewards_from_outcome(rewards, mask)
    else:
        _check_shape("rewards", rewards, mask.shape)
        token_rewards = rewards
    _check_values("rewards", token_rewards, mask)
    penalty = kl_penalty(logprobs.detach(), ref_logprobs.detach(), kind, response_mask=mask)
    return _zero_outside(token_rewards.to(penalty.dtype) - kl_coef * penalty, mask)
