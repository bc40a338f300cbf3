"""Statistics over the positions a mask keeps: mean and whitening."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _zero_outside


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
