"""Reward placement and shaping: outcome rewards on the last response token, DAPO's overlong penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _as_mask, _float_dtype


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


def overlong_penalty(response_lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong penalty `[B]`: 0 if L <= L_max - L_b; -p * (L - L_max + L_b) / L_b if L <= L_max; else -p.

    Yu et al., 2025, "DAPO" (Soft Overlong Punishment, added to the task reward). `buffer=0` gives a hard
    -penalty only for responses longer than `max_length`. Computed in float32, or in float64 for float64 lengths.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be > 0, got {max_length}")
    if not 0 <= buffer <= max_length:
        raise ValueError(f"buffer must be in [0, max_length={max_length}], got {buffer}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    lengths = response_lengths.to(_float_dtype(response_lengths))
    start = max_length - buffer
    ramp = (lengths - start) / buffer if buffer > 0 else torch.zeros_like(lengths)
    out = torch.where(lengths <= start, torch.zeros_like(lengths), -penalty * ramp.clamp(max=1.0))
    return torch.where(lengths > max_length, torch.full_like(lengths, -penalty), out)
