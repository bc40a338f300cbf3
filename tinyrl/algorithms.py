"""The RL algorithms core: advantage estimators, policy and value losses, KL estimators, loss aggregation.

Everything here is a pure tensor function: no model, engine or config inside. Token-level tensors are
`[B, T]` over response tokens and `response_mask` is 1 on real response tokens. Each estimator, loss,
KL estimator and aggregation mode is registered by name, so a config can pick it and a user can add one.

Behaviour on awkward input (each one tested):

- Positions outside `response_mask` never influence a result, whatever they hold (NaN and inf included):
  inputs are replaced by 0 there before any arithmetic, so neither values nor gradients can pick up NaN.
- Rows with no response token get zero advantages, take no part in group statistics, contribute nothing to a
  loss and are not counted as sequences by the `seq-*` aggregation modes.
- A group of one sample, or a group whose rewards are all equal, gets zero advantages from every group estimator.
- Rewards, values, advantages and current-policy log-probs must be finite on response tokens, and no log-prob may
  be NaN there; otherwise a `ValueError` names the tensor and the offending rows. `old_logprobs` and
  `ref_logprobs` may be +-inf (a sampler can report them): log-ratios are clamped before `exp`, so no ratio
  overflows.

Gradient accumulation: a trainer that splits a mini-batch into micro-batches computes the whole mini-batch's
divisor once with `loss_normalizer(mode, [mask of every micro-batch])` and passes it as `normalizer=` to each
micro-batch's `policy_loss` / `value_loss` / `kl_loss` / `aggregate`. The sum of the micro-batch losses is then
exactly the whole mini-batch loss (and its gradient is the whole mini-batch gradient) for every aggregation
mode, whatever each micro-batch's padded length.
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import itertools
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "KL_LOG_RATIO_CLAMP",
    "POLICY_LOSSES",
    "PRESET_KEYS",
    "LossNormalizer",
    "aggregate",
    "available_presets",
    "compute_advantages",
    "entropy_from_logits",
    "groups_with_reward_variance",
    "importance_log_ratio",
    "kl_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "load_preset",
    "logprobs_from_logits",
    "loss_normalizer",
    "masked_mean",
    "masked_whiten",
    "overlong_penalty",
    "policy_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "token_rewards_from_outcome",
    "validate_preset",
    "value_loss",
]

# exp(20) ~ 4.9e8: finite in float16/bfloat16/float32, far beyond any clip range in use.
LOG_RATIO_CLAMP = 20.0
# Bound on the log-ratio (and on the result) of the k3 estimator, whose exp(-log_ratio) term explodes first.
KL_LOG_RATIO_CLAMP = 10.0

AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {}
AGG_MODES: dict[str, Callable[..., Tensor]] = {}


# --------------------------------------------------------------------------------------------------------------
# Validation and masking helpers
# --------------------------------------------------------------------------------------------------------------


def _lookup(registry: Mapping[str, Callable], name: str, what: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid names: {sorted(registry)}")
    return registry[name]


def _as_mask(response_mask: Tensor, name: str = "response_mask") -> Tensor:
    """`response_mask` as a bool `[B, T]` tensor; 0/1 ints or floats are accepted, anything else is an error."""
    if not isinstance(response_mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(response_mask.shape)}")
    if response_mask.dtype == torch.bool:
        return response_mask
    if ((response_mask != 0) & (response_mask != 1)).any():
        raise ValueError(f"{name} must hold only 0 and 1")
    return response_mask.bool()


def _check_shape(name: str, x: Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (same as response_mask)")


def _check_values(name: str, x: Tensor, mask: Tensor, allow_inf: bool = False) -> None:
    """Raise if `x` is NaN (or, unless `allow_inf`, infinite) anywhere `mask` is True, naming the rows."""
    bad = torch.isnan(x) if allow_inf else ~torch.isfinite(x)
    bad = bad & mask
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(-1).nonzero().flatten().tolist()
        kind = "NaN" if allow_inf else "non-finite (NaN or inf)"
        raise ValueError(f"{name} has {kind} values on response tokens in rows {rows[:10]}")


def _float_dtype(x: Tensor) -> torch.dtype:
    """Arithmetic dtype: float32 at least, float64 kept."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with every position outside `mask` set to 0 (NaN/inf there cannot reach values or gradients)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _supported_kwargs(fn: Callable, kwargs: Mapping[str, object]) -> dict[str, object]:
    """The subset of `kwargs` that `fn` declares (all of them if it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _declared_options(registry: Mapping[str, Callable], skip: frozenset[str]) -> set[str]:
    names: set[str] = set()
    for fn in registry.values():
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return names - skip


def _check_options(options: Mapping[str, object], registry: Mapping[str, Callable], fn: Callable, what: str,
                   skip: frozenset[str]) -> None:
    """Options known to some registered function pass (the chosen one may ignore them); unknown names raise."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = _declared_options(registry, skip)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; options in use: {sorted(known)}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is True: sum(x * m) / sum(m), 0 where there are none."""
    x = _zero_outside(x, mask)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Whitening over masked positions: (x - mean) / sqrt(var + eps), unbiased var, 0 outside `mask`.

    The advantage normalisation of PPO implementations (studied in Engstrom et al., 2020, "Implementation
    Matters in Deep Policy Gradients").
    """
    count = mask.sum()
    mean = masked_mean(x, mask)
    centred = _zero_outside(x - mean, mask)
    var = (centred**2).sum() / (count - 1).clamp(min=1)
    return centred * torch.rsqrt(var + eps)


# --------------------------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------------------------

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


def token_rewards_from_outcome(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """Place each sequence's reward `[B]` on its last response token: r[b, t_last(b)] = rewards[b], else 0.

    `t_last(b)` is the last index where `response_mask[b]` is 1; a row with no response token gets no reward.
    """
    mask = _as_mask(response_mask)
    if rewards.dim() != 1 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"outcome rewards must be [B] with B={mask.shape[0]}, got shape {tuple(rewards.shape)}")
    width = mask.shape[1]
    positions = torch.arange(width, device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    out[rows, last[has_tokens]] = rewards.to(dtype)[has_tokens]
    return out


def _group_ids(group_index: Tensor | Sequence[Hashable], batch: int) -> Tensor:
    """Dense int64 group ids `0..G-1` from a `[B]` int tensor or any sequence of hashable ids (e.g. uid strings)."""
    if isinstance(group_index, Tensor):
        if group_index.dim() != 1 or group_index.shape[0] != batch:
            raise ValueError(f"group_index must be [B] with B={batch}, got shape {tuple(group_index.shape)}")
        if group_index.is_floating_point() or group_index.is_complex():
            raise ValueError(f"group_index must hold integers, got dtype {group_index.dtype}")
        return torch.unique(group_index, return_inverse=True)[1].long()
    ids = list(group_index)
    if len(ids) != batch:
        raise ValueError(f"group_index must have B={batch} entries, got {len(ids)}")
    dense: dict[Hashable, int] = {}
    return torch.tensor([dense.setdefault(g, len(dense)) for g in ids], dtype=torch.long)


def _require_groups(group_index: Tensor | None, estimator: str) -> Tensor:
    if group_index is None:
        raise ValueError(
            f"advantage estimator {estimator!r} needs group_index ([B] ids, equal within a prompt's group)"
        )
    return group_index


def _sequence_scores(token_rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence score (sum of token rewards over the response) and whether the row has any response token."""
    return _zero_outside(token_rewards, mask).sum(-1), mask.any(-1)


def _per_group(values: Tensor, groups: Tensor, reduce: str) -> Tensor:
    """`[G]` reduction (`sum`, `amax` or `amin`) of the `[B]` `values` over each group id `0..G-1`."""
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    start = {"sum": 0.0, "amax": -math.inf, "amin": math.inf}[reduce]
    out = torch.full((num_groups,), start, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, groups.to(values.device), values, reduce)


def _group_spread(scores: Tensor, valid: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row max and min of the `valid` scores of the row's group (both 0 for a group with none)."""
    groups = groups.to(scores.device)
    high = _per_group(torch.where(valid, scores, -math.inf), groups, "amax")
    low = _per_group(torch.where(valid, scores, math.inf), groups, "amin")
    empty = ~torch.isfinite(high)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    return torch.where(empty, zero, high)[groups], torch.where(empty, zero, low)[groups]


def _group_centred(scores: Tensor, valid: Tensor, groups: Tensor, weights: Tensor | None = None) -> Tensor:
    """Per row: s_i - sum_j w_j s_j / sum_j w_j over the `valid` rows j of i's group (w = 1 by default); 0 if invalid.

    Computed on d = s - max_group(s): in a group of equal scores every d is exactly 0, so its centred scores are
    exactly 0 in any precision. The plain sum/count mean is not: the mean of eight float32 copies of 0.7 differs
    from 0.7 by rounding, and a std division would turn that difference into an advantage.
    """
    groups = groups.to(scores.device)
    weights = valid.to(scores.dtype) if weights is None else torch.where(valid, weights.to(scores.dtype), 0.0)
    high, _ = _group_spread(scores, valid, groups)
    offsets = torch.where(valid, scores - high, 0.0)
    total_weight = _per_group(weights, groups, "sum")
    mean_offset = _per_group(weights * offsets, groups, "sum") / total_weight.clamp(min=1)
    return torch.where(valid, offsets - mean_offset[groups], 0.0)


def _group_size(valid: Tensor, groups: Tensor, dtype: torch.dtype) -> Tensor:
    """Per row: the number of `valid` rows in the row's group."""
    groups = groups.to(valid.device)
    return _per_group(valid.to(dtype), groups, "sum")[groups]


def _group_std(centred: Tensor, valid: Tensor, groups: Tensor) -> Tensor:
    """Per row: unbiased std of the row's group, sqrt(sum_j c_j^2 / (n - 1)) from centred scores (0 for n = 1)."""
    groups = groups.to(centred.device)
    count = _group_size(valid, groups, centred.dtype)
    squares = _per_group(torch.where(valid, centred**2, 0.0), groups, "sum")[groups]
    return (squares / (count - 1).clamp(min=1)).sqrt()


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
                       gamma: float = 1.0, lam: float = 1.0, **options: object) -> tuple[Tensor, Tensor]:
    """Advantages and returns `[B, T]` from the registered estimator `estimator`; both are 0 outside the mask.

    `rewards` is `[B]` (one outcome reward per sequence, placed on its last response token) or `[B, T]`
    (token rewards, e.g. with a KL penalty folded in; entries outside the mask are ignored). `group_index`
    `[B]` (ints or any hashable ids) marks the samples of one prompt; group estimators require it. `gae`
    requires `values` `[B, T]`. `returns` are the critic targets for `gae` and equal the advantages otherwise.
    Estimator options (`norm_by_std`, `eps`, `whiten`) are passed to the estimators that declare them and
    ignored by the others, so a trainer can pass its whole config; a name no estimator knows raises.
    """
    fn = _lookup(ADVANTAGE_ESTIMATORS, estimator, "advantage estimator")
    _check_options(options, ADVANTAGE_ESTIMATORS, fn, "advantage estimator", _ESTIMATOR_CORE_ARGS)
    mask = _as_mask(response_mask)
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
    return fn(token_rewards, mask, **_supported_kwargs(fn, call))


def groups_with_reward_variance(rewards: Tensor, group_index: Tensor | Sequence[Hashable]) -> Tensor:
    """Bool `[B]`: True where the sample's group has unequal rewards (max_group(r) > min_group(r)).

    DAPO's dynamic sampling (Yu et al., 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale") keeps only such groups: a group whose rewards are all equal has zero group-relative advantage.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a [B] tensor")
    if not bool(torch.isfinite(rewards).all()):
        rows = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards are non-finite in rows {rows[:10]}")
    groups = _group_ids(group_index, rewards.shape[0]).to(rewards.device)
    r = rewards.to(_float_dtype(rewards))
    high, low = _group_spread(r, torch.ones_like(r, dtype=torch.bool), groups)
    return high > low


def overlong_penalty(response_lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong penalty `[B]`: 0 if L <= L_max - L_b; -p * (L - L_max + L_b) / L_b if L <= L_max; else -p.

    Yu et al., 2025, "DAPO" (Soft Overlong Punishment, added to the task reward). `buffer=0` gives a hard
    -penalty only for responses longer than `max_length`.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0, got {max_length}")
    if not 0 <= buffer <= max_length:
        raise ValueError(f"buffer must be in [0, max_length={max_length}], got {buffer}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    lengths = response_lengths.to(torch.float32)
    start = max_length - buffer
    ramp = (lengths - start) / buffer if buffer > 0 else torch.zeros_like(lengths)
    out = torch.where(lengths <= start, torch.zeros_like(lengths), -penalty * ramp.clamp(max=1.0))
    return torch.where(lengths > max_length, torch.full_like(lengths, -penalty), out)


# --------------------------------------------------------------------------------------------------------------
# Loss aggregation (and gradient accumulation)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossNormalizer:
    """The divisor of a whole mini-batch's loss for one aggregation `mode`; see `loss_normalizer`."""

    mode: str
    value: float


def _token_count(mask: Tensor) -> float:
    return float(mask.sum())


def _sequence_count(mask: Tensor) -> float:
    return float(mask.any(-1).sum())


Normalizer = LossNormalizer | float | Tensor | None


def _resolve_divisor(mode: str, normalizer: Normalizer, default: Callable[[], float | Tensor]) -> float | Tensor:
    if normalizer is None:
        return default()
    if isinstance(normalizer, LossNormalizer):
        if normalizer.mode != mode:
            raise ValueError(f"normalizer was computed for aggregation mode {normalizer.mode!r}, not {mode!r}")
        value: float | Tensor = normalizer.value
    else:
        value = normalizer
    as_float = float(value)
    if not math.isfinite(as_float) or as_float < 0:
        raise ValueError(f"normalizer must be a finite number >= 0, got {as_float}")
    return value


def _divide(numerator: Tensor, divisor: float | Tensor) -> Tensor:
    """numerator / divisor, and 0 (still attached to the graph) when the divisor is 0 (nothing to average)."""
    if float(divisor) == 0:
        return numerator * 0.0
    return numerator / divisor


def _agg_token_mean(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """token-mean: L = sum_{i,t} m_it * l_it / N; N = sum_{i,t} m_it over the whole mini-batch.

    Token-level normalisation of DAPO (Yu et al., 2025) and of PPO for LLMs.
    """
    divisor = _resolve_divisor("token-mean", normalizer, lambda: _token_count(response_mask))
    return _divide(_zero_outside(loss_mat, response_mask).sum(), divisor)


def _agg_seq_mean_token_mean(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """seq-mean-token-mean: L = 1/S * sum_i (sum_t m_it * l_it / |o_i|); S = sequences with >= 1 response token.

    The GRPO objective of Shao et al., 2024 ("DeepSeekMath"), eq. 3.
    """
    divisor = _resolve_divisor("seq-mean-token-mean", normalizer, lambda: _sequence_count(response_mask))
    per_sequence = _zero_outside(loss_mat, response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
    return _divide(per_sequence.sum(), divisor)


def _agg_seq_mean_token_sum(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """seq-mean-token-sum: L = 1/S * sum_i sum_t m_it * l_it; S = sequences with >= 1 response token.

    Sequence-level REINFORCE objective (Williams, 1992; RLOO, Ahmadian et al., 2024).
    """
    divisor = _resolve_divisor("seq-mean-token-sum", normalizer, lambda: _sequence_count(response_mask))
    return _divide(_zero_outside(loss_mat, response_mask).sum(), divisor)


def _agg_seq_mean_token_sum_norm(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """seq-mean-token-sum-norm: L = 1/S * sum_i (sum_t m_it * l_it / C); C a constant, default the padded length T.

    Liu et al., 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO): no 1/|o_i| length bias. The mean
    over sequences keeps the loss scale independent of how many sequences a micro-batch holds.
    """
    divisor = _resolve_divisor("seq-mean-token-sum-norm", normalizer,
                               lambda: _sequence_count(response_mask) * response_mask.shape[-1])
    return _divide(_zero_outside(loss_mat, response_mask).sum(), divisor)


AGG_MODES.update({
    "token-mean": _agg_token_mean,
    "seq-mean-token-mean": _agg_seq_mean_token_mean,
    "seq-mean-token-sum": _agg_seq_mean_token_sum,
    "seq-mean-token-sum-norm": _agg_seq_mean_token_sum_norm,
})


def aggregate(loss_mat: Tensor, response_mask: Tensor, mode: str,
              normalizer: Normalizer = None) -> Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar: L = sum(numerator_mode(l, m)) / divisor (see `AGG_MODES`).

    Modes: `token-mean`, `seq-mean-token-mean` (GRPO, DeepSeekMath), `seq-mean-token-sum`,
    `seq-mean-token-sum-norm` (Dr. GRPO). `normalizer` is the divisor of the WHOLE mini-batch, normally the
    `LossNormalizer` returned by `loss_normalizer` (a plain number is taken as the divisor itself); None uses
    this tensor alone. Positions outside the mask never contribute; a divisor of 0 gives a loss of 0.
    """
    fn = _lookup(AGG_MODES, mode, "aggregation mode")
    mask = _as_mask(response_mask)
    _check_shape("loss_mat", loss_mat, mask.shape)
    return fn(loss_mat, mask, normalizer)


def loss_normalizer(mode: str, response_masks: Sequence[Tensor], constant: float | None = None) -> LossNormalizer:
    """The divisor of the whole mini-batch loss, from the response masks of ALL its micro-batches.

    token-mean: N = sum of every mask; seq-mean-token-mean and seq-mean-token-sum: S = sequences with a
    response token; seq-mean-token-sum-norm: S * C, C = `constant` (Dr. GRPO uses the maximum response
    length of the run; it defaults to the widest micro-batch, i.e. the whole mini-batch's padded length).

    Usage under gradient accumulation (micro-batches may have different padded lengths)::

        norm = loss_normalizer(agg, [mb.response_mask for mb in micro_batches], constant=max_response_tokens)
        for mb in micro_batches:
            loss, metrics = policy_loss(kind, ..., mb.response_mask, agg=agg, normalizer=norm)
            loss.backward()          # do NOT divide by the number of micro-batches
        optimizer.step()

    Summed, the micro-batch losses equal `aggregate` over the whole mini-batch (with the same `constant`),
    and so do their gradients. Under data parallelism, where gradients are averaged over ranks, compute the
    normalizer over the masks of all ranks and scale each rank's loss by the number of ranks.
    """
    _lookup(AGG_MODES, mode, "aggregation mode")
    masks = [_as_mask(m, f"response_masks[{i}]") for i, m in enumerate(response_masks)]
    if not masks:
        raise ValueError("response_masks is empty: pass the response mask of every micro-batch")
    if mode == "token-mean":
        return LossNormalizer(mode, sum(_token_count(m) for m in masks))
    sequences = sum(_sequence_count(m) for m in masks)
    if mode == "seq-mean-token-sum-norm":
        if constant is None:
            constant = max(m.shape[-1] for m in masks)
        if not (math.isfinite(constant) and constant > 0):
            raise ValueError(f"constant must be a finite number > 0, got {constant}")
        return LossNormalizer(mode, sequences * float(constant))
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return LossNormalizer(mode, sequences)
    raise ValueError(f"loss_normalizer does not know the divisor of user mode {mode!r}; compute it yourself")


# --------------------------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------------------------

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
                agg: str = "token-mean", **options: object) -> tuple[Tensor, dict[str, float]]:
    """The policy loss `kind` (ppo | gspo | cispo | reinforce | registered), aggregated with `agg`.

    Returns `(loss, metrics)`: `loss` a 0-dim tensor to minimise; `metrics` python floats averaged over the
    response tokens: `clip_frac_low`, `clip_frac_high` (tokens whose clipping removed the gradient; for
    cispo, whose weight was clipped), `clip_frac_dual` (when dual clipping is on), `approx_kl` (Schulman's
    k3 estimate of KL(pi_old || pi): mean of r - 1 - log r), `ratio_mean`, `ratio_max`, `ratio_min`.
    `old_logprobs=None` means exactly on-policy (old = logprobs.detach()). Options: `normalizer=` (see
    `loss_normalizer`) and any option a registered loss declares.
    """
    fn = _lookup(POLICY_LOSSES, kind, "policy loss")
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
    loss = aggregate(loss_mat, mask, agg, normalizer)

    with torch.no_grad():
        log_ratio = importance_log_ratio(logprobs.detach(), old_logprobs)
        ratio = torch.exp(log_ratio)
        has_tokens = bool(mask.any())
        metrics = {
            "clip_frac_low": 0.0,
            "clip_frac_high": 0.0,
            "approx_kl": float(masked_mean(ratio - 1.0 - log_ratio, mask)),
            "ratio_mean": float(masked_mean(ratio, mask)) if has_tokens else 1.0,
            "ratio_max": float(ratio[mask].max()) if has_tokens else 1.0,
            "ratio_min": float(ratio[mask].min()) if has_tokens else 1.0,
        }
        for name, stat in token_stats.items():
            metrics[name] = float(masked_mean(stat.to(ratio.dtype), mask))
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits, chunked over tokens
# --------------------------------------------------------------------------------------------------------------

DEFAULT_CHUNK_SIZE = 256


def _chunks(logits: Tensor, chunk_size: int) -> tuple[bool, list[slice | tuple]]:
    """Indices that cut `logits [..., V]` into 2-D `[rows, V]` views without copying it.

    If the leading dims flatten to a view (contiguous logits), the indices are row slices of `logits.view(-1, V)`;
    otherwise (e.g. `logits[:, :-1]`) they are tuples indexing `logits` itself, one chunk along the token dim.
    """
    vocab = logits.shape[-1]
    try:
        logits.view(-1, vocab)
        flat = True
    except RuntimeError:
        flat = False
    if flat:
        rows = logits.numel() // vocab if vocab else 0
        return True, [slice(start, start + chunk_size) for start in range(0, rows, chunk_size)]
    lead, width = logits.shape[:-2], logits.shape[-2]
    indices: list[slice | tuple] = []
    for outer in itertools.product(*(range(n) for n in lead)):
        for start in range(0, width, chunk_size):
            indices.append((*outer, slice(start, start + chunk_size)))
    return False, indices


def _views(logits: Tensor, others: Sequence[Tensor], flat: bool) -> tuple[Tensor, list[Tensor]]:
    """`logits` as `[N, V]` and `others` (shaped like logits' leading dims) as `[N]` when flat, else unchanged."""
    if not flat:
        return logits, list(others)
    return logits.view(-1, logits.shape[-1]), [o.reshape(-1) for o in others]


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits; float64 logits keep their precision."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _ChunkBuffers:
    """Float buffers of `chunk_size x V`, allocated once per call and reused for every chunk.

    Reuse matters on CPU: a fresh chunk-sized allocation per chunk is returned to the OS when freed and
    page-faulted in again by the next one, which costs more than the arithmetic.
    """

    def __init__(self, logits: Tensor, chunk_size: int, count: int):
        rows = min(chunk_size, max(1, logits.numel() // logits.shape[-1]))
        shape = (rows, logits.shape[-1])
        self.buffers = [torch.empty(shape, dtype=_compute_dtype(logits), device=logits.device) for _ in range(count)]

    def load(self, block: Tensor, temperature: float) -> Tensor:
        """The first buffer, holding z = block / temperature in float."""
        z = self.buffers[0][: block.shape[0]]
        z.copy_(block)
        if temperature != 1.0:
            z.div_(temperature)
        return z

    def spare(self, rows: int) -> Tensor:
        return self.buffers[1][:rows]


def _logsumexp_(z: Tensor) -> Tensor:
    """logsumexp over the last dim, overwriting `z` with exp(z - max)."""
    top = z.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows of -inf stay -inf, not NaN
    z.sub_(top).exp_()
    return z.sum(-1).log_().add_(top.squeeze(-1))


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(y) = z_y - logsumexp(z), z = logits / temperature, computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_size: int, temperature: float) -> Tensor:
        flat, indices = _chunks(logits, chunk_size)
        out = torch.empty(labels.shape, dtype=_compute_dtype(logits), device=logits.device)
        lse = torch.empty_like(out)
        src, (labels_v, out_v, lse_v) = _views(logits, [labels, out, lse], flat)
        buffers = _ChunkBuffers(logits, chunk_size, count=1)
        for idx in indices:
            z = buffers.load(src[idx], temperature)
            picked = z.gather(-1, labels_v[idx].unsqueeze(-1)).squeeze(-1)
            lse_chunk = _logsumexp_(z)
            out_v[idx] = picked - lse_chunk
            lse_v[idx] = lse_chunk
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        flat, indices = _chunks(logits, ctx.chunk_size)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        src, (labels_v, lse_v, grad_v) = _views(logits, [labels, lse, grad_out.contiguous()], flat)
        dst = grad_logits.view(-1, logits.shape[-1]) if flat else grad_logits
        buffers = _ChunkBuffers(logits, ctx.chunk_size, count=1)
        for idx in indices:
            g = grad_v[idx].to(_compute_dtype(logits)).unsqueeze(-1)
            # d log p(y) / dz = onehot(y) - softmax(z)
            block = buffers.load(src[idx], ctx.temperature).sub_(lse_v[idx].unsqueeze(-1)).exp_().mul_(-g)
            block.scatter_add_(-1, labels_v[idx].unsqueeze(-1), g)
            if ctx.temperature != 1.0:
                block.div_(ctx.temperature)
            dst[idx] = block
        return grad_logits, None, None, None


class _ChunkedEntropy(torch.autograd.Function):
    """H = -sum_v p_v log p_v, p = softmax(logits / temperature), computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int, temperature: float) -> Tensor:
        flat, indices = _chunks(logits, chunk_size)
        out = torch.empty(logits.shape[:-1], dtype=_compute_dtype(logits), device=logits.device)
        lse = torch.empty_like(out)
        src, (out_v, lse_v) = _views(logits, [out, lse], flat)
        buffers = _ChunkBuffers(logits, chunk_size, count=2)
        for idx in indices:
            z = buffers.load(src[idx], temperature)
            top = z.amax(dim=-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            # a -inf logit has p = 0; the clamp makes its p * log p term 0 instead of NaN
            shifted = z.sub_(top).clamp_(min=torch.finfo(z.dtype).min)
            weights = torch.exp(shifted, out=buffers.spare(z.shape[0]))
            total = weights.sum(-1)
            # H = log(sum e^s) - sum(e^s * s) / sum(e^s), with s = z - max
            log_total = total.log()
            out_v[idx] = log_total - weights.mul_(shifted).sum(-1) / total
            lse_v[idx] = log_total + top.squeeze(-1)
        ctx.save_for_backward(logits, lse, out)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, entropy = ctx.saved_tensors
        flat, indices = _chunks(logits, ctx.chunk_size)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        src, (lse_v, ent_v, grad_v) = _views(logits, [lse, entropy, grad_out.contiguous()], flat)
        dst = grad_logits.view(-1, logits.shape[-1]) if flat else grad_logits
        buffers = _ChunkBuffers(logits, ctx.chunk_size, count=2)
        for idx in indices:
            g = grad_v[idx].to(_compute_dtype(logits)).unsqueeze(-1)
            logp = buffers.load(src[idx], ctx.temperature).sub_(lse_v[idx].unsqueeze(-1))
            logp.clamp_(min=torch.finfo(logp.dtype).min)
            probs = torch.exp(logp, out=buffers.spare(logp.shape[0]))
            # dH/dz_v = -p_v * (log p_v + H)
            block = probs.mul_(logp.add_(ent_v[idx].unsqueeze(-1))).mul_(-g)
            if ctx.temperature != 1.0:
                block.div_(ctx.temperature)
            dst[idx] = block
        return grad_logits, None, None


def _check_logits(logits: Tensor, chunk_size: int, temperature: float) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch.Tensor [..., V]")
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         temperature: float = 1.0) -> Tensor:
    """log p(y_t) = z_{t,y_t} - logsumexp_v z_{t,v}, z = logits / temperature; float32 `[...]`, differentiable.

    The token log-likelihood of the policy-gradient theorem (Williams, 1992). `logits` `[..., V]` may be any
    float dtype (bf16 in training); at most `chunk_size` tokens are converted to float32 at a time, in the
    forward and in the backward pass, so no float32 `[B, T, V]` copy ever exists. Non-contiguous logits (such
    as `logits[:, :-1]`) are read in place.
    """
    _check_logits(logits, chunk_size, temperature)
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:-1]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits without V), got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if labels.numel() and bool(((labels < 0) | (labels >= logits.shape[-1])).any()):
        bad = ((labels < 0) | (labels >= logits.shape[-1])).nonzero()[0].tolist()
        raise ValueError(f"labels must be token ids in [0, {logits.shape[-1]}); first bad one at index {bad}")
    return _ChunkedLogprobs.apply(logits, labels.long(), chunk_size, float(temperature))


def entropy_from_logits(logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, temperature: float = 1.0) -> Tensor:
    """H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_{t,v} = -sum_v p_v log p_v, z = logits / temperature.

    Shannon entropy of the token distribution (the entropy bonus of PPO, Schulman et al., 2017), float32
    `[...]`, differentiable, computed `chunk_size` tokens at a time like `logprobs_from_logits`.
    """
    _check_logits(logits, chunk_size, temperature)
    return _ChunkedEntropy.apply(logits, chunk_size, float(temperature))


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------

PRESET_KEYS: tuple[str, ...] = (
    "name", "advantage", "norm_by_std", "gamma", "lam", "policy_loss", "clip_low", "clip_high", "dual_clip",
    "loss_agg", "loss_agg_normalizer", "kl_coef", "kl_estimator", "kl_in_reward", "entropy_coef", "value_clip",
    "dynamic_sampling", "dynamic_sampling_max_rounds", "overlong", "overlong_buffer", "overlong_penalty",
)
OVERLONG_MODES = ("none", "mask", "soft")


def _preset_dir():
    return importlib.resources.files("tinyrl.conf") / "algorithm"


def available_presets() -> list[str]:
    """Names of the algorithm presets shipped in `tinyrl/conf/algorithm/`."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def validate_preset(preset: Mapping[str, object], source: str = "preset") -> None:
    """Raise `ValueError` naming `source` and the key if `preset` lacks a key, has an extra one, or names an
    unknown estimator / policy loss / aggregation mode / KL estimator / overlong mode."""
    missing = [k for k in PRESET_KEYS if k not in preset]
    extra = sorted(set(preset) - set(PRESET_KEYS))
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}")
    if extra:
        raise ValueError(f"{source}: unknown key(s) {extra}; valid keys: {list(PRESET_KEYS)}")
    choices = {
        "advantage": ADVANTAGE_ESTIMATORS,
        "policy_loss": POLICY_LOSSES,
        "loss_agg": AGG_MODES,
        "kl_estimator": KL_ESTIMATORS,
        "overlong": OVERLONG_MODES,
    }
    for key, valid in choices.items():
        if preset[key] not in valid:
            raise ValueError(f"{source}: {key}={preset[key]!r} is not one of {sorted(valid)}")


@functools.lru_cache(maxsize=None)
def _read_preset_text(name: str) -> str:
    return (_preset_dir() / f"{name}.yaml").read_text(encoding="utf-8")


def load_preset(name: str) -> dict:
    """The algorithm preset `name` (conf/algorithm/<name>.yaml) as a plain dict with every key of `PRESET_KEYS`."""
    from omegaconf import OmegaConf

    available = available_presets()
    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_\-]+", name)) or name not in available:
        raise ValueError(f"unknown algorithm preset {name!r}; available: {available}")
    preset = OmegaConf.to_container(OmegaConf.create(_read_preset_text(name)), resolve=True)
    if not isinstance(preset, dict):
        raise ValueError(f"algorithm preset {name}.yaml must hold a mapping")
    validate_preset(preset, source=f"algorithm preset {name}.yaml")
    return preset
