"""Where and in which precision a run computes: device and dtype resolution shared by training and evaluation."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when one is visible, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Training compute dtype: bf16 autocast on GPU, float32 on CPU (weights stay float32 for the optimizer)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
