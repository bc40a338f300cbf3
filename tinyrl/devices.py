"""Where and in which precision a run computes: device and dtype resolution shared by training and evaluation."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

FLASH_ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


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


def resolve_attn_implementation(name: str, device: torch.device) -> Optional[str]:
    """Attention kernel to load models with: `auto` is flash_attention_2 on a CUDA device when flash-attn is
    installed, else None (transformers' default for the architecture: sdpa for Qwen2)."""
    if name == "auto":
        if device.type == "cuda" and importlib.util.find_spec(FLASH_ATTENTION_PACKAGES["flash_attention_2"]):
            return "flash_attention_2"
        return None
    return name
