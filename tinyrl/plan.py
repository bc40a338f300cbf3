"""Memory plan: how much memory each GPU needs for a config on a given number of ranks, why, and what lowers it.

`tinyrl-plan experiment=countdown_ppo_qwen3b --world-size 2 --gpu-gb 80` prints the table, the verdict and the
knobs that lower the peak; `memory_plan(cfg, world_size, gpu_gb)` returns it. A layout the trainer refuses (a
vLLM server or tensor parallelism under torchrun) is refused here too, with the trainer's message. The figures
follow what tinyrl allocates (tinyrl/models.py, distributed.py, trainer.py, policy_ops.py, rollout/):

- State, per rank, exact (checked to the byte against real FSDP shards and one process): the policy's and the
  critic's float32 master weights, float32 gradients and AdamW's two float32 moments (plus a 4-byte step per
  tensor), each parameter split on dim 0 into ceil(dim0 / world_size) rows; the frozen reference in the compute
  dtype. Float32 whatever the checkpoint holds: `load_policy` and the trainer make it so. `distributed.
  cpu_offload` moves all of it to CPU memory.
- A compute-dtype copy of the weights while they are used. Under FSDP (`world_size` > 1 or CPU offload) each
  no-gradient pass and each sampling call gathers the whole model in the compute dtype, and the update gathers
  the root and two layers at a time. In one process on a GPU, autocast keeps a bf16 copy of every float32
  weight it casts until the pass ends (its weight cache), so each pass holds one copy of the model in use.
- Sampling with the transformers engine (`rollout.engine=hf`): per rank `rollout.batch_size` sequences at a time
  (fewer when the rank has fewer). The engine allocates the full-length KV cache before the prompt pass, which
  adds per prompt token its cache, the logits and one layer's MLP intermediates; decoding keeps the cache in
  place, and dropping finished rows copies it once. It samples from the model it is given: in one process that
  is the float32 master model, so cache and logits are float32 (twice the bytes of a run under torchrun, which
  samples from the gathered bf16 copy).
- A colocated vLLM engine (`rollout.engine=vllm`, `layout=colocated`) holds `rollout.gpu_memory_utilization` of
  the GPU (its weights, KV cache and activations) while it generates, and its CUDA graphs on top (vLLM 0.32 does
  not count them in that share); with `rollout.sleep_level` it frees the rest during the other phases, but the
  graphs stay (vLLM offloads them only with `sleep_mode_offload_cudagraph`, which tinyrl does not set): an
  allowance, `tinyrl.rollout.VLLM_CUDA_GRAPHS_BYTES`, until a GPU run measures it. Level 1 keeps the engine's weights in CPU
  memory while it sleeps. A vLLM server (`layout=server`) holds nothing on the training GPU; its own GPU holds
  `gpu_memory_utilization` of it.
- No-gradient passes (old log-probs, reference log-probs, values): the copy above plus one micro-batch's logits.
- Update: gradients, the activations of one micro-batch of `trainer.micro_batch_tokens` tokens with its logits
  and their gradient, and the copy above. Activations per token and decoder layer (compute dtype b bytes):
  b * (10 H + 2 kv + 4 I) when every layer keeps them for backward, after the operations of a Qwen2 layer (two
  RMSNorms keep input and output, q/k/v and the GQA-expanded k/v, attention output, o_proj input; gate, SiLU, up
  and their product in the MLP); b * H (the layer input) with gradient checkpointing, plus one layer
  recomputed. Logits: the response positions' `[rows, R+1, V]` and their gradient. (Korthikanti et al., 2022,
  "Reducing Activation Recomputation in Large Transformer Models", derive the same kind of count for GPT.)
- Optimizer step: gradients plus AdamW's temporary. On a GPU torch's foreach AdamW makes sqrt(v) for every
  parameter at once (one float32 copy of the parameters); on the CPU it steps one tensor at a time.
- Not counted: the weight sync's transients (one tensor in the compute dtype and vLLM's two 1 GiB packing
  buffers on the server layout), the CUDA context, communication buffers and allocator fragmentation: the 10%
  headroom is for them.

A plan fits when its peak is at most 90% of the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinyrl.config import ConfigError, TrainConfig, uses_critic, uses_reference
from tinyrl.rollout import engine_spec

GIB = 1024**3
HEADROOM = 0.10  # share of the GPU a plan keeps free
ACTIVATIONS = "activations of one micro-batch (trainer.micro_batch_tokens), with logits"


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

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of a decoder layer, by module name."""
        h, kv, i = self.hidden_size, self.kv_size, self.intermediate_size
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h),
                "up_proj": (i, h), "down_proj": (h, i)}

    def adapter_shapes(self, rank: int, targets) -> list[tuple[int, ...]]:
        """LoRA's A [r, in] and B [out, r] for every adapted linear layer (`model.lora.target_modules`; all-linear:
        every linear layer of every decoder layer, the LM head excepted)."""
        linear = self.linear_shapes()
        names = list(linear) if targets == "all-linear" else list(targets)
        unknown = [n for n in names if n not in linear]
        if unknown:
            raise ConfigError(f"model.lora.target_modules: tinyrl-plan counts adapters on a decoder layer's linear "
                              f"layers ({', '.join(linear)}), not {unknown}")
        per_layer = [shape for n in names for shape in ((rank, linear[n][1]), (linear[n][0], rank))]
        return per_layer * self.num_layers


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
    """Per-GPU bytes of each component and of each phase (the components alive together in it); `peak` is the
    largest phase, `fits` compares it with the GPU; `advice` lists config changes that lower the peak."""

    world_size: int
    gpu_bytes: float
    components: dict[str, int]
    phases: dict[str, int]
    cpu_bytes: int  # per rank: the offloaded state, a sleeping vLLM engine's weights (level 1)
    causes: dict[str, list[str]] = field(default_factory=dict)  # phase -> its components, largest first
    notes: list[str] = field(default_factory=list)  # why a term is what it is, when that is not obvious
    advice: list[str] = field(default_factory=list)

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
        lines += [f"| {name} | {value / GIB:.2f} |" for name, value in self.components.items() if value]
        lines += [f"| **phase: {name}** | **{value / GIB:.2f}** |" if name == self.peak_phase else
                  f"| phase: {name} | {value / GIB:.2f} |" for name, value in self.phases.items()]
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: fits or not, the peak with its phase and largest terms; then why and what lowers it."""
        usable = (1 - HEADROOM) * self.gpu_bytes
        word = "fits" if self.fits else "does NOT fit"
        terms = ", ".join(f"{name} {self.components[name] / GIB:.1f}" for name in self.causes[self.peak_phase][:3])
        line = (f"{word}: peak {self.peak / GIB:.1f} GiB in {self.peak_phase} ({terms}) of "
                f"{self.gpu_bytes / GIB:.0f} GiB per GPU; {usable / GIB:.1f} GiB usable after {HEADROOM:.0%} headroom")
        if self.cpu_bytes:
            line += f"; {self.cpu_bytes / GIB:.1f} GiB of CPU memory per rank"
        lines = [line] + [f"  why: {note}" for note in self.notes]
        if self.advice:
            lines.append("  lower the peak with: " + "; ".join(self.advice))
        return "\n".join(lines)


def memory_plan(cfg: TrainConfig, world_size: int = 1, gpu_gb: float = 80.0, device: str = "cuda",
                advise: bool = True) -> MemoryPlan:
    """Per-GPU memory of `cfg` trained on `world_size` ranks with `gpu_gb` GiB each (see the module doc).

    `device="cpu"` plans a CPU run (float32 compute, no autocast copy, AdamW one tensor at a time). Raises
    ConfigError for a layout the trainer refuses.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    from tinyrl.preflight import check_engine_fits_launch

    check_engine_fits_launch(cfg, world_size)
    plan = _plan(cfg, world_size, gpu_gb, device)
    if advise and device != "cpu":
        plan.advice = _advice(cfg, world_size, gpu_gb, plan)
    return plan


def _plan(cfg: TrainConfig, world_size: int, gpu_gb: float, device: str) -> MemoryPlan:
    shape = model_shape(cfg)
    gpu = device != "cpu"
    compute = 2 if gpu and cfg.model.dtype in ("auto", "bfloat16", "float16") else 4
    sharded = world_size > 1 or cfg.distributed.cpu_offload
    offloaded = cfg.distributed.cpu_offload
    r, t = cfg.rollout, cfg.trainer
    notes: list[str] = []
    c: dict[str, int] = {}  # components

    # --- state
    policy_shapes = shape.parameter_shapes("lm")
    n_policy = sharded_elements(policy_shapes, world_size)
    lora = cfg.model.lora if cfg.model.lora.enabled else None
    if lora is None:
        trained_shapes, n_trained, trained = policy_shapes, n_policy, "policy"
        c["policy weights (float32)"] = 4 * n_policy
    else:  # the frozen base in the compute dtype; only the float32 adapters have gradients and AdamW state
        trained_shapes = shape.adapter_shapes(lora.rank, lora.target_modules)
        n_trained, trained = sharded_elements(trained_shapes, world_size), "LoRA adapter"
        c["frozen base weights (compute dtype)"] = compute * n_policy
        c["LoRA adapter weights (float32)"] = 4 * n_trained
        notes.append(f"LoRA rank {lora.rank}: {sum(math.prod(s) for s in trained_shapes) / 1e6:.1f}M adapter "
                     f"parameters train; the frozen base is stored in the compute dtype and, with adapters "
                     f"disabled, is the KL term's reference (no second copy)")
    c[f"{trained} AdamW moments (float32)"] = 8 * n_trained + 4 * len(trained_shapes)
    if uses_reference(cfg.algorithm) and lora is None:
        c["reference weights (compute dtype)"] = compute * n_policy
    critic = uses_critic(cfg.algorithm)
    critic_shapes = shape.parameter_shapes("value")
    n_critic = sharded_elements(critic_shapes, world_size) if critic else 0
    if critic:
        c["critic weights (float32)"] = 4 * n_critic
        c["critic AdamW moments (float32)"] = 8 * n_critic + 4 * len(critic_shapes)
    state = [k for k in c]
    cpu_bytes = sum(c.values()) if offloaded else 0
    c[f"{trained} gradients (float32)"] = 4 * n_trained
    if critic:
        c["critic gradients (float32)"] = 4 * n_critic

    # --- the compute-dtype copy of the weights in use
    full_policy, full_critic = shape.parameters("lm"), shape.parameters("value") if critic else 0
    copy_name = None
    if sharded:
        copy_name = "gathered model (compute dtype), no-gradient passes"
        c[copy_name] = compute * max(full_policy, full_critic)
    elif compute < 4:
        copy_name = "autocast copy of the weights (compute dtype), one process"
        # a LoRA base already in the compute dtype is used as it is: autocast copies only the adapters
        policy_copy = full_policy if lora is None else sum(math.prod(s) for s in trained_shapes)
        c[copy_name] = compute * max(policy_copy, full_critic)
        if lora is None:
            notes.append("in one process autocast casts each float32 weight to bf16 once per pass and keeps the copy "
                         "until the pass ends; under torchrun FSDP gathers bf16 weights instead")

    # --- generation
    generation: list[str] = []
    engine_awake, engine_asleep = [], []
    own_memory = engine_spec(r.engine).gpu_memory  # an engine that is not the policy itself: its row says
    if own_memory is not None:
        held = own_memory(r, gpu_gb, full_policy)
        c.update(held.awake)
        engine_awake, engine_asleep = list(held.awake), list(held.asleep)
        generation = engine_awake
        cpu_bytes += held.cpu_bytes
        notes.extend(held.notes)
    else:
        # in one process the engine samples from the policy itself: float32 master weights, or LoRA's base in the
        # compute dtype
        sampling_bytes = compute if sharded or lora is not None else 4
        batch = min(r.batch_size, math.ceil(t.prompts_per_step / world_size) * r.n)  # this rank's sequences
        row = r.max_prompt_tokens + r.max_response_tokens
        kv_token = shape.kv_bytes_per_token(sampling_bytes)
        full_cache = batch * row * kv_token
        prefill = full_cache + batch * r.max_prompt_tokens * (
            kv_token + shape.vocab_size * sampling_bytes + 3 * shape.intermediate_size * sampling_bytes)
        decode = 2 * full_cache + batch * shape.vocab_size * 4
        if sharded:
            c["gathered policy for sampling (compute dtype)"] = compute * full_policy
            generation.append("gathered policy for sampling (compute dtype)")
        prefill_name = "sampling: prompt pass (full KV cache, prompt logits)"
        decode_name = "sampling: decoding (full KV cache, copied once)"
        c[prefill_name], c[decode_name] = prefill, decode
        generation.append(prefill_name if prefill >= decode else decode_name)
        notes.append(f"sampling holds the KV cache of {batch} sequences of {row} tokens at a time "
                     f"(rollout.batch_size, or this rank's prompts x rollout.n when fewer)")
        if not sharded and compute < 4 and lora is None:
            notes.append("the transformers engine samples from the model it is given: in one process the float32 "
                         "master model, so its KV cache and logits are float32, twice what a torchrun rank's "
                         "gathered bf16 copy needs")

    # --- no-gradient passes and update
    rows = max(1, t.micro_batch_tokens // (r.max_prompt_tokens + r.max_response_tokens))
    c["no-gradient pass logits (one micro-batch)"] = logits_bytes(shape, rows, r.max_response_tokens, compute, False)
    acts = activation_bytes(shape, t.micro_batch_tokens, compute, cfg.model.gradient_checkpointing)
    acts += logits_bytes(shape, rows, r.max_response_tokens, compute, with_gradient=True)
    c[ACTIVATIONS] = acts
    update_copy = copy_name
    if sharded:
        layer = sum(math.prod(s) for s in shape.layer_shapes())
        root = full_policy - layer * shape.num_layers
        update_copy = "FSDP gathered root + 2 layers, unsharded layer gradients"
        layer_trained = layer if lora is None else sum(math.prod(s) for s in trained_shapes) // shape.num_layers
        c[update_copy] = compute * (root + 2 * layer) + 4 * 2 * layer_trained
    # AdamW's temporary sqrt(v): every (sharded) parameter at once on a GPU (foreach), the largest tensor on a CPU
    largest = max(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in trained_shapes)
    c["AdamW step temporary (float32)"] = 0 if offloaded else 4 * (max(n_trained, n_critic) if gpu else largest)

    resident = [] if offloaded else state
    grads = [] if offloaded else ["critic gradients (float32)" if n_critic > n_trained else f"{trained} gradients (float32)"]
    phase_parts = {
        "generation": resident + generation,
        "no-gradient passes": resident + engine_asleep + ([copy_name] if copy_name else [])
                              + ["no-gradient pass logits (one micro-batch)"],
        "update": resident + engine_asleep + grads
                  + [ACTIVATIONS]
                  + ([update_copy] if update_copy else []),
        "optimizer step": resident + engine_asleep + grads + ["AdamW step temporary (float32)"],
    }
    phases = {name: sum(c[k] for k in parts) for name, parts in phase_parts.items()}
    causes = {name: sorted(parts, key=lambda k: -c[k]) for name, parts in phase_parts.items()}
    return MemoryPlan(world_size, gpu_gb * GIB, c, phases, cpu_bytes, causes, notes)


def _advice(cfg: TrainConfig, world_size: int, gpu_gb: float, plan: MemoryPlan) -> list[str]:
    """Config changes that lower this plan's peak, each with the peak it gives (re-planned, so a knob that does not
    touch the peak's terms never shows up)."""
    r, t = cfg.rollout, cfg.trainer
    candidates: list[tuple[str, TrainConfig, int]] = []

    def change(text: str, section: str, **values) -> None:
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
        candidates.append((text, changed, world_size))

    if r.engine == "hf" and r.batch_size > 1:
        change(f"rollout.batch_size={r.batch_size // 2}", "rollout", batch_size=r.batch_size // 2)
    if r.engine == "vllm" and r.layout == "colocated":
        if r.gpu_memory_utilization > 0.1:
            lower = round(r.gpu_memory_utilization - 0.1, 2)
            change(f"rollout.gpu_memory_utilization={lower:g}", "rollout", gpu_memory_utilization=lower)
        if r.sleep_level is None:
            change("rollout.sleep_level=1", "rollout", sleep_level=1)
    if t.micro_batch_tokens > 1024:
        change(f"trainer.micro_batch_tokens={t.micro_batch_tokens // 2}", "trainer",
               micro_batch_tokens=t.micro_batch_tokens // 2)
    if not cfg.model.gradient_checkpointing:
        change("model.gradient_checkpointing=true", "model", gradient_checkpointing=True)
    if not cfg.distributed.cpu_offload:
        change("distributed.cpu_offload=true (launched with torchrun)", "distributed", cpu_offload=True)
    if not (r.engine == "vllm" and r.layout == "server"):  # a server layout trains in one process
        candidates.append((f"torchrun --nproc_per_node={2 * world_size} (state sharded over twice the GPUs)",
                           cfg, 2 * world_size))
    out = []
    for text, changed, ranks in candidates:
        peak = _plan(changed, ranks, gpu_gb, "cuda").peak
        if peak < plan.peak - 0.05 * GIB:
            out.append(f"{text} -> {peak / GIB:.1f} GiB")
    return out


def presets_table(experiments: list[str], world_size: int, gpu_gb: float = 80.0) -> str:
    """The plans of packaged experiments side by side, GiB per GPU (the README's table is this text)."""
    from tinyrl.compose import load_config

    plans = {name: memory_plan(load_config([f"experiment={name}"]), world_size, gpu_gb, advise=False)
             for name in experiments}
    rows: list[str] = []  # every plan's components in its own order, a new one after its predecessor
    for plan in plans.values():
        previous = -1
        for name in (n for n, value in plan.components.items() if value):
            if name not in rows:
                rows.insert(previous + 1, name)
            previous = rows.index(name)
    lines = [f"| per GPU, {world_size} rank(s), GiB | " + " | ".join(f"`{name}`" for name in plans) + " |",
             "| --- |" + " ---: |" * len(plans)]
    for row in rows:
        cells = [f"{plan.components[row] / GIB:.2f}" if plan.components.get(row) else "-" for plan in plans.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for phase in next(iter(plans.values())).phases:
        lines.append(f"| phase: {phase} | " + " | ".join(f"{plan.phases[phase] / GIB:.2f}" for plan in plans.values())
                     + " |")
    lines.append("| **peak** | " + " | ".join(f"**{plan.peak / GIB:.1f} ({plan.peak_phase})**"
                                            for plan in plans.values()) + " |")
    return "\n".join(lines)


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
    import sys

    from tinyrl.compose import load_config

    parser = argparse.ArgumentParser(
        prog="tinyrl-plan", description="Per-GPU memory of a training config on N ranks, whether it fits, and what "
                                        "lowers it."
    )
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="ranks (GPUs) the run uses (default 1: one process, no torchrun)")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of each GPU in GiB (default 80)")
    args, overrides = parser.parse_known_args(argv)
    try:
        plan = memory_plan(load_config(overrides), args.world_size, args.gpu_gb)
    except ConfigError as err:
        print(f"tinyrl-plan: {err}", file=sys.stderr)
        sys.exit(2)
    print(plan.table())
    print(plan.verdict())
