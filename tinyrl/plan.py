"""Memory plan: how much memory each GPU needs for a config on a given number of ranks, and whether it fits.

`tinyrl-plan experiment=countdown_ppo_qwen3b --world-size 2 --gpu-gb 80` prints the table; `memory_plan(cfg,
world_size, gpu_gb)` returns it. The figures follow how tinyrl trains (tinyrl/distributed.py, trainer.py):

- Sharded state (FSDP2, per rank, exact): float32 master weights, float32 gradients and AdamW's two float32
  moments (plus a 4-byte step per tensor) of policy and critic, each parameter split on dim 0 into
  ceil(dim0 / world_size) rows; the frozen reference in the compute dtype. `distributed.cpu_offload` moves
  all of it to CPU memory.
- Transient, one phase at a time (estimates):
  generation (transformers engine): the gathered policy in the compute dtype plus the larger of the prompt
  pass (the full-length KV cache, allocated up front, plus per prompt token its cache, logits and one layer's
  MLP intermediates) and decoding (twice the full-length KV cache of `rollout.batch_size` sequences: dropping
  finished rows copies it); a colocated vLLM engine instead holds
  `rollout.gpu_memory_utilization` of the GPU, throughout or (`rollout.sleep_level`) only while it generates;
  a vLLM server (`rollout.layout=server`) holds nothing on the training GPU;
  no-gradient passes: one gathered model plus one micro-batch's logits;
  update: gradients, the activations of one micro-batch of `trainer.micro_batch_tokens` tokens, and FSDP's
  gathered root and two layers.
- Activations per token and decoder layer (compute dtype b bytes): b * (10 H + 2 kv + 4 I) when every layer
  keeps them for backward, after the operations of a Qwen2 layer (two RMSNorms keep input and output, q/k/v
  and the GQA-expanded k/v, attention output, o_proj input; gate, SiLU, up and their product in the MLP);
  b * H (the layer input) with gradient checkpointing, plus one layer recomputed. Logits: the response
  positions' `[rows, R+1, V]` tensor and its gradient in the compute dtype. (Korthikanti et al., 2022,
  "Reducing Activation Recomputation in Large Transformer Models", derive the same kind of count for GPT.)

A plan fits when its peak is at most 90% of the GPU: the rest is for the CUDA context, communication buffers
and allocator fragmentation.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyrl.config import TrainConfig, uses_critic, uses_reference
from tinyrl.rollout import engine_spec

GIB = 1024**3
HEADROOM = 0.10  # share of the GPU a plan keeps free


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2-family decoder that memory depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_shapes(self) -> list[tuple[int, ...]]:
        h, kv, i = self.hidden_size, self.kv_size, self.intermediate_size
        return [(h, h), (h,), (kv, h), (kv,), (kv, h), (kv,), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]

    def parameter_shapes(self, head: str = "lm") -> list[tuple[int, ...]]:
        """Every parameter tensor: embeddings, layers, final norm, then the LM head (untied) or a value head."""
        shapes = [(self.vocab_size, self.hidden_size)] + self.layer_shapes() * self.num_layers + [(self.hidden_size,)]
        if head == "lm" and not self.tied:
            shapes.append((self.vocab_size, self.hidden_size))
        if head == "value":
            shapes += [(1, self.hidden_size), (1,)]
        return shapes

    def parameters(self, head: str = "lm") -> int:
        return sum(math.prod(s) for s in self.parameter_shapes(head))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes


# Shapes of models a plan may be asked about without their files at hand (from their published config.json).
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-0.5B": ModelShape(151936, 896, 4864, 24, 14, 2, tied=True),
    "Qwen/Qwen2.5-1.5B": ModelShape(151936, 1536, 8960, 28, 12, 2, tied=True),
    "Qwen/Qwen2.5-3B": ModelShape(151936, 2048, 11008, 36, 16, 2, tied=True),
    "Qwen/Qwen2.5-7B": ModelShape(152064, 3584, 18944, 28, 28, 4, tied=False),
}
for _name in list(KNOWN_SHAPES):
    KNOWN_SHAPES[_name + "-Instruct"] = KNOWN_SHAPES[_name]


def shape_from_hf_config(config: dict) -> ModelShape:
    return ModelShape(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        tied=bool(config.get("tie_word_embeddings", False)),
    )


def model_shape(cfg: TrainConfig) -> ModelShape:
    """The policy's shape: the tiny model's config, a local model's config.json, or a known hub model."""
    m = cfg.model
    if m.path is None:
        t = m.tiny
        return ModelShape(t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads,
                          t.num_kv_heads, tied=False)
    local = Path(m.path) / "config.json"
    if local.is_file():
        return shape_from_hf_config(json.loads(local.read_text()))
    if m.path in KNOWN_SHAPES:
        return KNOWN_SHAPES[m.path]
    raise ValueError(
        f"model.path: no config.json at {m.path!r} and not one of the shapes tinyrl-plan knows "
        f"({', '.join(sorted(KNOWN_SHAPES))}); point model.path at a local copy of the model"
    )


def sharded_elements(shapes: list[tuple[int, ...]], world_size: int) -> int:
    """Elements rank 0 (the largest share) holds when every tensor is split on dim 0 into world_size chunks."""
    return sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in shapes)


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Bytes the decoder layers keep for backward for one micro-batch of `tokens` tokens (see the module doc)."""
    h, kv, i = shape.hidden_size, shape.kv_size, shape.intermediate_size
    per_layer = dtype_bytes * (10 * h + 2 * kv + 4 * i) * tokens
    if checkpointing:
        return shape.num_layers * dtype_bytes * h * tokens + per_layer
    return shape.num_layers * per_layer


def logits_bytes(shape: ModelShape, rows: int, response_tokens: int, dtype_bytes: int, with_gradient: bool) -> int:
    """The response positions' logits `[rows, R+1, V]` (and their gradient, in training)."""
    one = rows * (response_tokens + 1) * shape.vocab_size * dtype_bytes
    return 2 * one if with_gradient else one


@dataclass
class MemoryPlan:
    """Per-GPU bytes of each component and phase; `peak` is the largest phase, `fits` compares it to the GPU."""

    world_size: int
    gpu_bytes: float
    components: dict[str, int]
    phases: dict[str, int]
    cpu_bytes: int  # per rank, with distributed.cpu_offload

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool:
        return self.peak <= (1 - HEADROOM) * self.gpu_bytes

    def table(self) -> str:
        lines = [f"| per GPU, state sharded over {self.world_size} rank(s) | GiB |", "| --- | ---: |"]
        lines += [f"| {name} | {value / GIB:.2f} |" for name, value in self.components.items()]
        lines += [f"| **peak: {name}** | **{value / GIB:.2f}** |" if name == self.peak_phase else
                  f"| peak: {name} | {value / GIB:.2f} |" for name, value in self.phases.items()]
        return "\n".join(lines)

    def verdict(self) -> str:
        usable = (1 - HEADROOM) * self.gpu_bytes
        word = "fits" if self.fits else "does NOT fit"
        line = (f"{word}: peak {self.peak / GIB:.1f} GiB ({self.peak_phase}) of {self.gpu_bytes / GIB:.0f} GiB "
                f"per GPU; {usable / GIB:.1f} GiB usable after {HEADROOM:.0%} headroom")
        if self.cpu_bytes:
            line += f"; {self.cpu_bytes / GIB:.1f} GiB of CPU memory per rank for the offloaded state"
        if not self.fits:
            line += (". Lower trainer.micro_batch_tokens or rollout.batch_size, enable model.gradient_checkpointing "
                     "or distributed.cpu_offload, or add GPUs")
        return line


def memory_plan(cfg: TrainConfig, world_size: int = 1, gpu_gb: float = 80.0, device: str = "cuda") -> MemoryPlan:
    """Per-GPU memory of `cfg` trained on `world_size` ranks with `gpu_gb` GiB each (see the module doc).

    `device="cpu"` plans a CPU run (float32 compute, no KV cache beyond the transformers engine's).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shape = model_shape(cfg)
    gpu = device != "cpu"
    compute = 2 if gpu and cfg.model.dtype in ("auto", "bfloat16", "float16") else 4
    sharded = world_size > 1 or cfg.distributed.cpu_offload
    r, t = cfg.rollout, cfg.trainer
    policy_shapes = shape.parameter_shapes("lm")
    n_policy = sharded_elements(policy_shapes, world_size)
    components: dict[str, int] = {
        "policy weights (float32)": 4 * n_policy,
        "policy gradients (float32)": 4 * n_policy,
        "policy AdamW moments (float32)": 8 * n_policy + 4 * len(policy_shapes),
    }
    if uses_reference(cfg.algorithm):
        components["reference weights (compute dtype)"] = compute * n_policy
    n_critic = 0
    if uses_critic(cfg.algorithm):
        critic_shapes = shape.parameter_shapes("value")
        n_critic = sharded_elements(critic_shapes, world_size)
        components["critic weights (float32)"] = 4 * n_critic
        components["critic gradients (float32)"] = 4 * n_critic
        components["critic AdamW moments (float32)"] = 8 * n_critic + 4 * len(critic_shapes)
    state_keys = list(components)
    cpu_bytes = 0
    if cfg.distributed.cpu_offload:
        cpu_bytes = sum(components.values())

    row = r.max_prompt_tokens + r.max_response_tokens
    rows = max(1, t.micro_batch_tokens // row)
    full_policy = shape.parameters("lm")
    # Sharded models are gathered in the compute dtype to sample; one process samples from its float32 model.
    sampling = compute if sharded else 4
    generation = 0
    # an engine that is not the policy itself says what it holds on a training GPU (tinyrl.rollout.ENGINES)
    engine_memory = engine_spec(r.engine).gpu_memory
    engine_parts = engine_memory(r, gpu_gb) if engine_memory is not None else {}
    components.update(engine_parts)
    if engine_memory is None:
        batch = min(r.batch_size, math.ceil(t.prompts_per_step / world_size) * r.n)  # this rank's sequences
        kv_token = shape.kv_bytes_per_token(sampling)
        # The transformers engine preallocates the full-length KV cache (`StaticKVDecoder`) before the prompt's
        # forward pass, which adds per prompt token the transient cache, logits-sized and MLP intermediates
        # (measured on the CPU: +1 cache against the growing-cache path at 24 and 48 new tokens). Decoding keeps
        # the cache in place; dropping finished rows copies it once (old and new exist together), with float32
        # logits of one step.
        full_cache = batch * row * kv_token
        prefill = full_cache + batch * r.max_prompt_tokens * (
            kv_token + shape.vocab_size * sampling + 3 * shape.intermediate_size * sampling)
        decode = 2 * full_cache + batch * shape.vocab_size * 4
        sampling_parts = {
            "gathered policy for sampling (compute dtype)": sampling * full_policy if sharded else 0,
            "sampling: prompt pass (full KV cache, prompt logits)": prefill,
            "sampling: decoding (full KV cache, copied once)": decode,
        }
        components.update(sampling_parts)
        generation = sampling_parts["gathered policy for sampling (compute dtype)"] + max(prefill, decode)
    passes = (compute * max(full_policy, shape.parameters("value")) if sharded else 0) + logits_bytes(
        shape, rows, r.max_response_tokens, compute, with_gradient=False
    )
    components["no-gradient pass (gathered model + logits)"] = passes
    acts = activation_bytes(shape, t.micro_batch_tokens, compute, cfg.model.gradient_checkpointing)
    acts += logits_bytes(shape, rows, r.max_response_tokens, compute, with_gradient=True)
    components[f"activations, one micro-batch of {t.micro_batch_tokens} tokens"] = acts
    fsdp_transient = 0
    if sharded:
        layer = sum(math.prod(s) for s in shape.layer_shapes())
        root = full_policy - layer * shape.num_layers
        fsdp_transient = compute * (root + 2 * layer) + 4 * 2 * layer  # gathered root, two layers; unsharded grads
        components["FSDP gathered root + 2 layers, unsharded layer gradients"] = fsdp_transient

    # Gradients exist only during an update, and the policy's are freed before the critic's are made.
    gradient_keys = ("policy gradients (float32)", "critic gradients (float32)")
    offloaded = cfg.distributed.cpu_offload
    resident = 0 if offloaded else sum(components[k] for k in state_keys if k not in gradient_keys)
    engine = sum(engine_parts.values())
    awake = 0 if r.sleep_level is not None else engine  # a sleeping engine frees its memory after generating
    grads = 0 if offloaded else max(components.get(k, 0) for k in gradient_keys)
    phases = {
        "generation": resident + engine + generation,
        "no-gradient passes": resident + awake + passes,
        "update": resident + awake + grads + acts + fsdp_transient,
    }
    return MemoryPlan(world_size, gpu_gb * GIB, components, phases, cpu_bytes)


def measured_peak_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """The peak bytes of tensors alive on `device` while `fn()` runs, from the PyTorch profiler's memory timeline
    (every allocation and free, tensors that existed before included). To check a plan on a real run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.json"
        prof.export_memory_timeline(str(path), device=device)
        _, sizes = json.loads(path.read_text())
    return max(sum(row) for row in sizes)


def plan_main(argv: list[str] | None = None) -> None:
    """`tinyrl-plan [--world-size N] [--gpu-gb G] [overrides...]`: print the plan of the composed config."""
    import argparse

    from tinyrl.compose import load_config

    parser = argparse.ArgumentParser(
        prog="tinyrl-plan", description="Per-GPU memory of a training config on N ranks, and whether it fits."
    )
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="ranks (GPUs) the run uses (default 1)")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of each GPU in GiB (default 80)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(overrides)
    plan = memory_plan(cfg, args.world_size, args.gpu_gb)
    print(plan.table())
    print(plan.verdict())
