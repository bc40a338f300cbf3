"""Advantage estimators (GAE, GRPO, Dr. GRPO, RLOO, OPO, REINFORCE++), registered by name, and their dispatcher."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from ._common import (
    _as_mask,
    _check_options,
    _check_shape,
    _check_values,
    _float_dtype,
    resolve_function,
    _supported_kwargs,
    _zero_outside,
)
from .groups import _group_centred, _group_ids, _group_size, _group_spread, _group_std
from .masked import masked_whiten
from .rewards import token_rewards_from_outcome

AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}

_ESTIMATOR_CORE_ARGS = frozenset({"token_rewards", "response_mask", "group_index", "values", "gamma", "lam"})


def register_advantage_estimator(
    name: str, *, override: bool = False
) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Register `fn(token_rewards, response_mask, *, group_index, values, gamma, lam, **own_options)` by name.

    The estimator declares only the keyword arguments it uses; `compute_advantages` passes those. It returns
    `(advantages, returns)`, both `[B, T]` and zero outside `response_mask`. `group_index` arrives as int64
    group ids `0..G-1` (or None), `token_rewards` as float `[B, T]` already zero outside the mask.
    """

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS and not override:
            raise ValueError(f"advantage estimator {name!r} is already registered (pass override=True to replace it)")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def _require_groups(group_index: Tensor | None, estimator: str) -> Tensor:
    if group_index is None:
        raise ValueError(
            f"advantage estimator {estimator!r} needs group_index ([B] ids, equal within a prompt's group)"
        )
    return group_index


def _sequence_scores(token_rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence score (sum of token rewards over the response) and whether the row has any response token."""
    return _zero_outside(token_rewards, mask).sum(-1), mask.any(-1)


def _broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    advantages = _zero_outside(per_sequence[:, None].expand(mask.shape), mask)
    return advantages


def _discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t'} where t' is the next response token (masked positions are skipped)."""
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], token_rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return _zero_outside(returns, mask)


@register_advantage_estimator("gae")
def gae_advantages(token_rewards: Tensor, response_mask: Tensor, *, values: Tensor | None, gamma: float,
                   lam: float, whiten: bool = True) -> tuple[Tensor, Tensor]:
    """GAE: A_t = sum_l (gamma*lam)^l * delta_{t+l}, delta_t = r_t + gamma*V_{t+1} - V_t; returns R_t = A_t + V_t.

    Schulman et al., 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"
    (as used by PPO, Schulman et al., 2017). V after the last response token is 0; masked positions inside a
    row are skipped (t+1 means the next response token). `returns` are the critic's targets and are taken
    before `whiten`, which (default on, as in PPO for LLMs) whitens the advantages over the batch's tokens.
    """
    if values is None:
        raise ValueError("advantage estimator 'gae' needs values ([B, T] critic values of the response tokens)")
    values = _zero_outside(values.to(token_rewards.dtype), response_mask)
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros_like(token_rewards[:, 0])
    next_advantage = torch.zeros_like(next_value)
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        keep = response_mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage_t = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(keep, advantage_t, torch.zeros_like(advantage_t))
        next_value = torch.where(keep, values[:, t], next_value)
        next_advantage = torch.where(keep, advantage_t, next_advantage)
    returns = _zero_outside(advantages + values, response_mask)
    if whiten:
        advantages = masked_whiten(advantages, response_mask)
    return advantages, returns


@register_advantage_estimator("grpo")
def grpo_advantages(token_rewards: Tensor, response_mask: Tensor, *, group_index: Tensor | None,
                    norm_by_std: bool = True, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of sequence i.

    Shao et al., 2024, "DeepSeekMath" (Group Relative Policy Optimization). std is the unbiased group std;
    `norm_by_std=False` keeps only the mean (as Dr. GRPO). A sequence's reward is the sum of its token rewards.
    """
    groups = _require_groups(group_index, "grpo")
    scores, valid = _sequence_scores(token_rewards, response_mask)
    centred = _group_centred(scores, valid, groups)
    per_sequence = centred / (_group_std(centred, valid, groups) + eps) if norm_by_std else centred
    advantages = _broadcast(per_sequence, response_mask)
    return advantages, advantages


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(token_rewards: Tensor, response_mask: Tensor, *,
                       group_index: Tensor | None) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: A_i = r_i - mean(r_group), no std division.

    Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO).
    """
    groups = _require_groups(group_index, "dr_grpo")
    scores, valid = _sequence_scores(token_rewards, response_mask)
    advantages = _broadcast(_group_centred(scores, valid, groups), response_mask)
    return advantages, advantages


@register_advantage_estimator("rloo")
def rloo_advantages(token_rewards: Tensor, response_mask: Tensor, *,
                    group_index: Tensor | None) -> tuple[Tensor, Tensor]:
    """RLOO: A_i = r_i - 1/(n-1) * sum_{j != i} r_j = n/(n-1) * (r_i - mean(r_group)); 0 for a group of one.

    Ahmadian et al., 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (REINFORCE Leave-One-Out, after Kool et al., 2019).
    """
    groups = _require_groups(group_index, "rloo")
    scores, valid = _sequence_scores(token_rewards, response_mask)
    count = _group_size(valid, groups, scores.dtype)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    advantages = _broadcast(scale * _group_centred(scores, valid, groups), response_mask)
    return advantages, advantages


@register_advantage_estimator("opo")
def opo_advantages(token_rewards: Tensor, response_mask: Tensor, *,
                   group_index: Tensor | None) -> tuple[Tensor, Tensor]:
    """OPO: A_i = r_i - b, b = sum_j |o_j| r_j / sum_j |o_j| over the group (length-weighted optimal baseline).

    Hao et al., 2025, "On-Policy RL with Optimal Reward Baseline".
    """
    groups = _require_groups(group_index, "opo")
    scores, valid = _sequence_scores(token_rewards, response_mask)
    lengths = response_mask.sum(-1).to(scores.dtype)
    advantages = _broadcast(_group_centred(scores, valid, groups, weights=lengths), response_mask)
    return advantages, advantages


@register_advantage_estimator("reinforce_pp")
def reinforce_pp_advantages(token_rewards: Tensor, response_mask: Tensor, *,
                            gamma: float) -> tuple[Tensor, Tensor]:
    """REINFORCE++: A_t = whiten_batch(G_t), G_t = sum_{k>=t} gamma^(k-t) r_k over the response tokens.

    Hu, 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models". Whitening
    (unbiased std) is over every response token of the batch; token rewards usually carry the KL penalty.
    """
    advantages = masked_whiten(_discounted_returns(token_rewards, response_mask, gamma), response_mask)
    return advantages, advantages


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(token_rewards: Tensor, response_mask: Tensor, *,
                                     group_index: Tensor | None) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: A = whiten_batch(r_i - mean(r_group)), broadcast to the tokens of sequence i.

    Hu, 2025, "REINFORCE++" (the group-baseline variant): the group mean removes the prompt's difficulty,
    whitening over the batch's response tokens sets the scale. Rows of a group whose scores are all equal (a
    group of one included) stay 0: whitening's shift by the batch mean would hand them an advantage that says
    nothing about their answers.
    """
    groups = _require_groups(group_index, "reinforce_pp_baseline")
    scores, valid = _sequence_scores(token_rewards, response_mask)
    high, low = _group_spread(scores, valid, groups)
    whitened = masked_whiten(_broadcast(_group_centred(scores, valid, groups), response_mask), response_mask)
    advantages = _zero_outside(whitened, (high > low)[:, None] & response_mask)
    return advantages, advantages


def compute_advantages(estimator: str, rewards: Tensor, response_mask: Tensor,
                       group_index: Tensor | Sequence[Hashable] | None = None, values: Tensor | None = None,
                       gamma: float = 1.0, lam: float = 1.0, scored: Tensor | None = None,
                       **options: object) -> tuple[Tensor, Tensor]:
    """Advantages and returns `[B, T]` from the estimator `estimator` (a registered name, `module:function` or
    `file.py:function`); both are 0 outside the mask.

    `rewards` is `[B]` (one outcome reward per sequence, placed on its last response token) or `[B, T]`
    (token rewards, e.g. with a KL penalty folded in; entries outside the mask are ignored). `group_index`
    `[B]` (ints or any hashable ids) marks the samples of one prompt; group estimators require it. `gae`
    requires `values` `[B, T]`. `returns` are the critic targets for `gae` and equal the advantages otherwise.
    Estimator options (`norm_by_std`, `eps`, `whiten`) are passed to the estimators that declare them and
    ignored by the others, so a trainer can pass its whole config; a name no estimator knows raises.

    `scored` `[B]` bool (optional) marks the rows whose reward exists. A row without one (every TRL reward function
    returned None) is left out of every statistic, as a row without response tokens is, and gets A = 0 on every
    token; its returns are its values, so a critic keeps its estimate there. Its rewards are ignored (NaN allowed).
    This is TRL 1.16 GRPOTrainer's rule for "unscorable" completions: NaN rewards, nan-mean and nan-std per
    group, advantage 0.
    """
    fn = resolve_function(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    _check_options(options, ADVANTAGE_ESTIMATORS, fn, "advantage estimator", _ESTIMATOR_CORE_ARGS)
    mask = _as_mask(response_mask)
    unscored = None
    if scored is not None:
        if not isinstance(scored, Tensor) or scored.dim() != 1 or scored.shape[0] != mask.shape[0]:
            raise ValueError(f"scored must be a [B]=[{mask.shape[0]}] bool tensor")
        unscored = ~scored.to(device=mask.device, dtype=torch.bool)
        if isinstance(rewards, Tensor):
            rows = unscored.view(-1, *([1] * (rewards.dim() - 1)))
            rewards = torch.where(rows, torch.zeros((), dtype=rewards.dtype, device=rewards.device), rewards)
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    dtype = _float_dtype(rewards)
    if rewards.dim() == 1:
        if rewards.shape[0] != mask.shape[0]:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected [B]=[{mask.shape[0]}] or [B, T]")
        _check_values("rewards", rewards[:, None].expand(mask.shape), mask)
        token_rewards = token_rewards_from_outcome(rewards.to(dtype), mask)
    else:
        _check_shape("rewards", rewards, mask.shape)
        _check_values("rewards", rewards, mask)
        token_rewards = _zero_outside(rewards.to(dtype), mask)
    if values is not None:
        _check_shape("values", values, mask.shape)
        _check_values("values", values, mask)
    groups = _group_ids(group_index, mask.shape[0]).to(mask.device) if group_index is not None else None
    call = {"group_index": groups, "values": values, "gamma": gamma, "lam": lam, **options}
    if unscored is None:
        return fn(token_rewards, mask, **_supported_kwargs(fn, call))
    kept = mask & ~unscored[:, None]
    advantages, returns = fn(_zero_outside(token_rewards, kept), kept, **_supported_kwargs(fn, call))
    if values is not None:
        returns = torch.where(unscored[:, None] & mask, _zero_outside(values.to(returns.dtype), mask), returns)
    return advantages, returns
