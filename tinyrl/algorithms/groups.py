"""Per-group statistics of sequence scores (one group = the samples of one prompt)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from ._common import _float_dtype


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


def groups_with_reward_variance(rewards: Tensor, group_index: Tensor | Sequence[Hashable]) -> Tensor:
    """Bool `[B]`: True where the sample's group has unequal rewards (max_group(r) > min_group(r), exactly).

    DAPO's dynamic sampling (Yu et al., 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale") keeps only such groups: a group whose rewards are all equal has zero group-relative advantage. A NaN
    reward (one that does not apply) takes no part, so a group needs two rewards that apply and differ.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a [B] tensor")
    if bool(torch.isinf(rewards).any()):
        rows = torch.isinf(rewards).nonzero().flatten().tolist()
        raise ValueError(f"rewards are infinite in rows {rows[:10]}")
    groups = _group_ids(group_index, rewards.shape[0]).to(rewards.device)
    r = rewards.to(_float_dtype(rewards))
    applies = ~torch.isnan(r)
    high, low = _group_spread(torch.where(applies, r, 0.0), applies, groups)
    return high > low
