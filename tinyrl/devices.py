"""Where and in which precision a run computes: device and dtype resolution shared by training and evaluation,
and the few CUDA calls whose effect is per host thread (kept here, small, so that their callers' logic runs on a
CPU in tests with these functions replaced)."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
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


def visible_devices(server_devices: str, parent_visible: str | None) -> str:
    """`rollout.server_devices` as the server's CUDA_VISIBLE_DEVICES. Its entries are GPU indices as this process
    numbers them (the trainer's `device=cuda:1` counts the same way), so under a parent CUDA_VISIBLE_DEVICES=2,3
    the server's "0" is the machine's GPU 2."""
    wanted = [d.strip() for d in str(server_devices).split(",") if d.strip()]
    if not wanted or not all(d.isdigit() for d in wanted):
        raise ValueError(f"rollout.server_devices: comma-separated GPU indices such as '0' or '0,1', "
                         f"got {server_devices!r}")
    if parent_visible is None:
        return ",".join(wanted)
    visible = [d.strip() for d in parent_visible.split(",") if d.strip()]
    outside = [d for d in wanted if int(d) >= len(visible)]
    if outside:
        raise ValueError(f"rollout.server_devices: GPU {outside[0]} is not among the {len(visible)} GPUs this "
                         f"process sees (CUDA_VISIBLE_DEVICES={parent_visible!r})")
    return ",".join(visible[int(d)] for d in wanted)


# CUDA keeps one current device per host thread, and a new thread starts on device 0. Code that builds streams or
# communicators on "the current device" (vLLM's NCCL weight transfer, TRL's client) therefore needs the right one
# made current in whichever thread runs it.

def current_cuda_device() -> int | None:
    """The calling thread's current CUDA device, or None where this process has not started CUDA (a CPU run)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.current_device()


def use_device(device: torch.device | str | int | None) -> None:
    """Make `device` the calling thread's current CUDA device; nothing for None, a CPU device, or `cuda` without
    an index (the current one)."""
    if device is None:
        return
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


@contextlib.contextmanager
def on_device(device: torch.device | str | int | None) -> Iterator[None]:
    """Run a block with `device` as this thread's current CUDA device, then restore the previous one."""
    previous = current_cuda_device()
    use_device(device)
    try:
        yield
    finally:
        use_device(previous)


def synchronize(device: torch.device | str) -> None:
    """Wait until the kernels already queued on `device` (on every stream) have finished; nothing off CUDA.

    Needed before another stream reads what this thread's stream wrote: streams that vLLM and its NCCL weight
    transfer create are non-blocking, so they do not wait for the trainer's kernels on the default stream."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
