"""A stand-in for CUDA's per-thread current device, for tests of the code that must set it (no GPU here).

CUDA keeps one current device per host thread and starts every new thread on device 0. `install` replaces the
few functions of `tinyrl.devices` that touch it (the only CUDA calls the plumbing makes) by this model of it, and
records every device synchronisation.
"""

from __future__ import annotations

import threading

import torch


class FakeCuda:
    def __init__(self) -> None:
        self._local = threading.local()
        self.synchronized: list[str] = []

    def current(self) -> int:
        return getattr(self._local, "index", 0)  # a new thread starts on device 0, as in CUDA

    def use(self, device) -> None:
        if device is None:
            return
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type == "cuda" and device.index is not None:
            self._local.index = device.index

    def synchronize(self, device) -> None:
        self.synchronized.append(str(device))


def install(monkeypatch) -> FakeCuda:
    from tinyrl import devices

    cuda = FakeCuda()
    monkeypatch.setattr(devices, "current_cuda_device", cuda.current)
    monkeypatch.setattr(devices, "use_device", cuda.use)
    monkeypatch.setattr(devices, "synchronize", cuda.synchronize)
    return cuda
