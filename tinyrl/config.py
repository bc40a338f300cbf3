"""Typed configuration for training runs, and its validation.

The dataclasses below are the schema of the Hydra config tree in `conf/` (registered in Hydra's ConfigStore as
`train_schema`; the `algorithm:` node, `AlgorithmConfig`, lives with the algorithms in tinyrl/algorithms/settings.py),
so a wrong type or an unknown key fails when the config is composed, naming the key. `validate` adds the checks a
type cannot express (ranges, divisibility, paths, names of registered functions and engines) and runs before any
model is loaded; user code a config names (`file.py:function`) is loaded by `tinyrl.preflight`.

Batch sizes, each with one meaning:
- `trainer.prompts_per_step`: problems sampled per RL step; each gets `rollout.n` completions.
- `trainer.prompts_per_mini_batch`: problems (with all their completions) per optimizer step; must divide
  `prompts_per_step`, so one RL step makes `ppo_epochs * prompts_per_step / prompts_per_mini_batch` optimizer steps.
- `trainer.micro_batch_tokens`: tokens per forward/backward pass, padding included (a memory knob only; it never
  changes the gradient, because losses are normalised over the whole mini-batch). With `trainer.packing` the
  sequences of a micro-batch are laid end to end, so nearly every one of those tokens is a real one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from tinyrl.algorithms.settings import AlgorithmConfig, RolloutCorrectionConfig  # the `algorithm:` node (no torch)


@dataclass
class TinyModelConfig:
    """Shape of the tiny Qwen2 model built locally when `model.path` is null (tests, CPU demo)."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    corpus_problems: int = 2000  # training-split problems whose prompt+demonstration train the tokenizer


@dataclass
class LoraConfig:
    """LoRA training (tinyrl/lora.py, built with PEFT): only low-rank adapters train; the base stays frozen."""

    enabled: bool = False
    rank: int = 8  # r: the adapters' inner dimension
    alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input while training
    # all-linear: every linear layer but the LM head (PEFT's name); or a list of module names (q_proj, v_proj, ...)
    target_modules: Any = "all-linear"
    # merged: push W + (alpha/r) B A to the rollout engine (every engine); adapter: push only the adapters, as a new
    # vLLM LoRA adapter per version (rollout.engine=vllm, vLLM built with LoRA support: GPU)
    weight_sync: str = "merged"


@dataclass
class ModelConfig:
    path: Optional[str] = None  # local dir or hub name of the policy; null builds the tiny model in the run dir
    critic_path: Optional[str] = None  # null: the critic starts from the policy's weights (PPO only)
    # base: the task's raw prompt; chat: the tokenizer's chat template; auto: chat when the tokenizer has one
    template: str = "base"
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU; or float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    # auto: flash_attention_2 on GPU when flash-attn is installed, else sdpa; or sdpa | eager | flash_attention_2 |
    # flash_attention_3 | flex_attention (GPU only: no backward pass on the CPU)
    attn_implementation: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TaskConfig:
    name: str = "countdown"  # registered name, "pkg.module:Class" or "path/to/file.py:Class"
    kwargs: dict = field(default_factory=dict)
    train_size: int = 20000  # problems in the training split the sampler cycles through
    data_seed: int = 0  # seeds the problem sets, kept apart from `seed` so every run seed sees the same eval set
    eval_split: str = "test"
    eval_size: int = 500
    reward_workers: int = 2  # processes scoring completions; 0 scores in-process (no time, CPU or memory limit)
    reward_timeout_s: float = 5.0  # wall-clock seconds one reward may take
    reward_cpu_s: float = 10.0  # CPU seconds one reward may use (RLIMIT_CPU, Linux); 0: no limit
    reward_memory_mb: int = 4096  # memory a reward worker may allocate beyond what it holds once loaded; 0: no limit
    reward_error_limit: Optional[float] = 1.0  # stop when this share of one step's rewards fail; null: never


@dataclass
class RolloutConfig:
    # hf (transformers, any device) | vllm | an engine added to tinyrl.rollout.ENGINES | "path/to/file.py:Class"
    engine: str = "hf"
    n: int = 8  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    batch_size: int = 512  # hf engine: sequences decoded together
    timeout_s: float = 1800.0  # generation or weight sync taking longer raises instead of hanging
    # vllm engine; the engine options carry vLLM's own names (see conf/rollout/vllm.yaml)
    # colocated: the engine inside each training process | server: a process of its own (a vLLM server, or for hf the
    # transformers engine in a worker process), which can sample while the trainer updates (trainer.max_staleness)
    layout: str = "colocated"
    gpu_memory_utilization: float = 0.5  # share of the GPU vLLM may take (weights + KV cache)
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None  # null: max_prompt_tokens + max_response_tokens
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # true: no CUDA graphs (faster start, slower decoding)
    dtype: str = "auto"  # auto: the trainer's dtype (model.dtype) | float32 | bfloat16 | float16
    sleep_level: Optional[int] = None  # colocated, GPU only: 1 or 2 frees vLLM's memory during each update
    kv_cache_memory_bytes: Optional[int] = None  # KV cache size; null: from gpu_memory_utilization (GPU), 256 MiB (CPU)
    server_url: Optional[str] = None  # server layout: a running server; null starts one for this run
    server_devices: Optional[str] = None  # server layout, started here: its GPUs as this process numbers them ("0")
    weight_sync: str = "disk"  # server layout: disk (safetensors + reload, any device) | nccl (GPU broadcast)


@dataclass
class SFTConfig:
    """Supervised warm start on teacher traces before RL (s1-style distillation)."""

    enabled: bool = False
    traces_path: Optional[str] = None  # JSONL of {prompt, completion} or {messages}; null: the task's demonstrations
    num_traces: int = 5000  # training-split problems turned into traces when traces_path is null
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 100  # distillation checkpoint every N steps (also on SIGTERM/SIGINT), so a stop resumes


@dataclass
class BaselineArm:
    """One distillation-only arm: the teacher's traces it distils and where it starts."""

    name: str = "continued distillation"
    task_kwargs: dict = field(default_factory=dict)  # overrides of task.kwargs for the teacher (e.g. trace_misses: 0)
    start: str = "distilled"  # distilled: sft_model + the RL phase's seconds; base: base model + distillation and RL's


@dataclass
class BaselineConfig:
    """Distillation-only arms run after the RL arm, each given the distillation it could have had in RL's time."""

    enabled: bool = False
    arms: list[BaselineArm] = field(default_factory=lambda: [BaselineArm()])


@dataclass
class TrainerConfig:
    steps: int = 100  # RL steps
    prompts_per_step: int = 64
    prompts_per_mini_batch: int = 64
    ppo_epochs: int = 1
    micro_batch_tokens: int = 16384
    # sequences laid end to end in the log-prob, value and update passes (same numbers, no padding FLOPs): auto
    # packs when the attention kernel's cost follows the real tokens (flash-attention, flex_attention); true also
    # packs for sdpa/eager (block-diagonal masks over rows as wide as the longest sequence); false never
    packing: str = "auto"
    lr: float = 1e-6
    critic_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0: only before and after RL
    eval_pass_k: int = 0  # >0: also sample this many completions per eval problem and report pass@k
    save_every: int = 0  # 0: only at the end and on SIGTERM/SIGINT
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive optimizer updates with a non-finite loss or gradient before the run stops
    samples_every: int = 10  # write example completions every N steps (0: never)
    # k >= 1: the engine samples the next k batches while the trainer updates on this one, so a batch is trained on
    # by a policy up to k updates newer than the one that sampled it (needs algorithm.rollout_correction); 0: in series
    max_staleness: int = 0


@dataclass
class DistributedConfig:
    """Multi-process training under torchrun (FSDP2); see tinyrl/distributed.py."""

    timeout_s: float = 1800.0  # a rank waiting longer than this at a collective fails, naming where the others were
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory (GPU runs)


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    # wandb.init arguments, e.g. {project: tinyrl, mode: offline}; typed Any because omegaconf cannot merge a
    # command-line dict into an Optional[dict] node that holds null
    wandb: Any = None
    progress: bool = True
    plot: bool = True  # write curves.png at the end


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    run_dir: Optional[str] = None  # null: Hydra's output directory (or ./runs/<time> without Hydra)
    resume: Any = False  # false | true (latest checkpoint in run_dir) | path to a checkpoint directory
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def register_configs() -> None:
    """Register the schema with Hydra so `conf/train.yaml` composes onto typed nodes, and the resolvers the
    packaged configs use."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("tinyrl_options"):
        OmegaConf.register_new_resolver("tinyrl_options", packaged_options)


def packaged_options(group: str) -> str:
    """The options of a packaged config group, for help texts: `task` -> "countdown, countdown_tiny, custom"."""
    from importlib.resources import files

    return ", ".join(sorted(p.name[: -len(".yaml")] for p in files("tinyrl.conf").joinpath(group).iterdir()
                            if p.name.endswith(".yaml")))


def to_config(config: TrainConfig | DictConfig | dict) -> TrainConfig:
    """Turn a dataclass, dict or DictConfig into a validated `TrainConfig` object.

    Every key must be in the schema, however it got in (Hydra's `+key=value` included); only open mappings
    such as `task.kwargs` and `logging.wandb` take keys of the user's choosing.
    """
    if not isinstance(config, TrainConfig):
        container = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
        if not isinstance(container, Mapping):
            raise ConfigError(f"a config is a mapping of keys to values, got {type(container).__name__}")
        unknown = unknown_keys(container)
        if unknown:
            raise ConfigError("; ".join(f"{key}: {describe_unknown(key)}" for key in unknown))
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, config)
    except Exception as err:  # omegaconf names the key in its message
        raise ConfigError(f"invalid config: {err}") from err
    cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def unknown_keys(config: Mapping, schema: type | None = None, prefix: str = "") -> list[str]:
    """Dotted keys of `config` that the dataclass `schema` (default `TrainConfig`) does not define."""
    schema = schema or TrainConfig
    hints = typing.get_type_hints(schema)
    unknown = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in hints:
            unknown.append(name)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            unknown += unknown_keys(value, hints[key], name + ".")
    return unknown


def describe_unknown(key: str) -> str:
    """'unknown key', with the closest key of the schema when one is close (`trainer.stpes` -> `trainer.steps`)."""
    close = difflib.get_close_matches(key, schema_keys(), n=1, cutoff=0.75)
    return "unknown key" + (f" (did you mean {close[0]}?)" if close else "; every key is listed in tinyrl/config.py")


def schema_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema; open mappings (`task.kwargs`) count as one key."""
    schema = schema or TrainConfig
    keys = []
    for key, kind in typing.get_type_hints(schema).items():
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: TrainConfig) -> None:
    """Check ranges, divisibility and paths; raise ConfigError naming the key."""
    t, r, a, s, m = cfg.trainer, cfg.rollout, cfg.algorithm, cfg.sft, cfg.model
    for key, value in [
        ("trainer.prompts_per_step", t.prompts_per_step),
        ("trainer.prompts_per_mini_batch", t.prompts_per_mini_batch),
        ("trainer.ppo_epochs", t.ppo_epochs),
        ("trainer.micro_batch_tokens", t.micro_batch_tokens),
        ("trainer.keep_last", t.keep_last),
        ("trainer.max_bad_steps", t.max_bad_steps),
        ("rollout.n", r.n),
        ("rollout.max_prompt_tokens", r.max_prompt_tokens),
        ("rollout.max_response_tokens", r.max_response_tokens),
        ("rollout.batch_size", r.batch_size),
        ("task.eval_size", cfg.task.eval_size),
        ("task.train_size", cfg.task.train_size),
    ]:
        _check(value >= 1, key, f"must be >= 1, got {value}")
    for key, value in [
        ("trainer.steps", t.steps),
        ("trainer.eval_every", t.eval_every),
        ("trainer.save_every", t.save_every),
        ("trainer.warmup_steps", t.warmup_steps),
        ("trainer.eval_pass_k", t.eval_pass_k),
        ("trainer.samples_every", t.samples_every),
        ("trainer.max_staleness", t.max_staleness),
        ("task.reward_workers", cfg.task.reward_workers),
        ("sft.steps", s.steps),
        ("sft.save_every", s.save_every),
        ("threads", cfg.threads),
    ]:
        _check(value >= 0, key, f"must be >= 0, got {value}")
    _check(
        t.prompts_per_step % t.prompts_per_mini_batch == 0,
        "trainer.prompts_per_mini_batch",
        f"must divide trainer.prompts_per_step ({t.prompts_per_step}), got {t.prompts_per_mini_batch}",
    )
    _check(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    _check(t.critic_lr > 0, "trainer.critic_lr", f"must be > 0, got {t.critic_lr}")
    _check(t.max_grad_norm > 0, "trainer.max_grad_norm", f"must be > 0, got {t.max_grad_norm}")
    _check(r.temperature >= 0, "rollout.temperature", f"must be >= 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.top_k >= 0, "rollout.top_k", f"must be >= 0, got {r.top_k}")
    _check(r.timeout_s > 0, "rollout.timeout_s", f"must be > 0, got {r.timeout_s}")
    _validate_rollout(r)
    _check(cfg.task.reward_timeout_s > 0, "task.reward_timeout_s", "must be > 0")
    _check(m.template in ("base", "chat", "auto"), "model.template", f"must be base, chat or auto, got {m.template!r}")
    _check(
        m.dtype in ("auto", "float32", "bfloat16", "float16"),
        "model.dtype",
        f"must be auto, float32, bfloat16 or float16, got {m.dtype!r}",
    )
    _check(
        cfg.task.eval_split in ("train", "validation", "test"),
        "task.eval_split",
        f"must be train, validation or test, got {cfg.task.eval_split!r}",
    )
    if m.path is not None and looks_local(m.path):
        _check(os.path.isdir(m.path), "model.path", f"no model directory at {m.path!r}")
    if m.critic_path is not None and looks_local(m.critic_path):
        _check(os.path.isdir(m.critic_path), "model.critic_path", f"no model directory at {m.critic_path!r}")
    if s.enabled and s.traces_path is not None:
        _check(os.path.isfile(s.traces_path), "sft.traces_path", f"no file at {s.traces_path!r}")
    if s.enabled:
        _check(s.batch_size >= 1, "sft.batch_size", f"must be >= 1, got {s.batch_size}")
        _check(s.lr > 0, "sft.lr", f"must be > 0, got {s.lr}")
        _check(s.num_traces >= 1, "sft.num_traces", f"must be >= 1, got {s.num_traces}")
    _validate_lora(cfg)
    _validate_task(cfg.task)
    _validate_distributed(cfg)
    _validate_packing(cfg)
    _validate_baseline(cfg)
    if m.path is None:
        tiny = m.tiny
        _check(
            tiny.hidden_size % tiny.num_heads == 0 and tiny.hidden_size // tiny.num_heads >= 32,
            "model.tiny.hidden_size",
            f"hidden_size / num_heads must be an integer >= 32 (got {tiny.hidden_size} / {tiny.num_heads})",
        )
    _validate_logging(cfg.logging)
    _validate_staleness(cfg)
    _validate_algorithm(a, r)  # last: it imports torch, so the checks above answer without it


def _validate_lora(cfg: TrainConfig) -> None:
    lora = cfg.model.lora
    if not lora.enabled:
        return
    _check(isinstance(lora.rank, int) and lora.rank >= 1, "model.lora.rank", f"must be an integer >= 1, got {lora.rank!r}")
    _check(lora.alpha > 0, "model.lora.alpha", f"must be > 0, got {lora.alpha}")
    _check(0 <= lora.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    targets = lora.target_modules
    _check(targets == "all-linear" or (isinstance(targets, (list, tuple)) and len(targets) > 0
                                       and all(isinstance(t, str) and t for t in targets)),
           "model.lora.target_modules", f"must be all-linear or a non-empty list of module names, got {targets!r}")
    _check(lora.weight_sync in ("merged", "adapter"), "model.lora.weight_sync",
           f"must be merged or adapter, got {lora.weight_sync!r}")
    _check(lora.weight_sync == "merged" or (cfg.rollout.engine == "vllm" and cfg.rollout.layout == "colocated"),
           "model.lora.weight_sync",
           f"adapter sync needs rollout.engine=vllm with rollout.layout=colocated (got rollout.engine="
           f"{cfg.rollout.engine}, layout={cfg.rollout.layout}); use merged")
    _check(lora.weight_sync == "merged" or cfg.rollout.sleep_level != 2, "model.lora.weight_sync",
           "adapter sync keeps vLLM's base weights, which rollout.sleep_level=2 discards at every update; use "
           "rollout.sleep_level=1 or weight_sync=merged")
    import importlib.util

    _check(importlib.util.find_spec("peft") is not None, "model.lora.enabled",
           "LoRA needs PEFT, which is not installed: pip install 'tinyrl[lora]'")


def _validate_rollout(r: RolloutConfig) -> None:
    from tinyrl.rollout import ENGINES

    _check(r.engine in ENGINES or _is_user_code(r.engine, "rollout.engine"), "rollout.engine",
           f"must be one of {', '.join(ENGINES)} or a RolloutEngine subclass as 'pkg.module:Class' or "
           f"'path/to/file.py:Class', got {r.engine!r}")
    _check(r.layout in ("colocated", "server"), "rollout.layout", f"must be colocated or server, got {r.layout!r}")
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", f"must be >= 1, got {r.tensor_parallel_size}")
    if r.max_model_len is not None:
        need = r.max_prompt_tokens + r.max_response_tokens
        _check(r.max_model_len >= need, "rollout.max_model_len",
               f"must hold max_prompt_tokens + max_response_tokens ({need}), got {r.max_model_len}")
    _check(r.dtype in ("auto", "float32", "bfloat16", "float16"), "rollout.dtype",
           f"must be auto, float32, bfloat16 or float16, got {r.dtype!r}")
    _check(r.sleep_level in (None, 1, 2), "rollout.sleep_level", f"must be null, 1 or 2, got {r.sleep_level!r}")
    _check(r.sleep_level is None or r.layout == "colocated", "rollout.sleep_level",
           "applies to the colocated layout only (a server keeps its GPU)")
    _check(r.kv_cache_memory_bytes is None or r.kv_cache_memory_bytes > 0, "rollout.kv_cache_memory_bytes",
           f"must be null or > 0, got {r.kv_cache_memory_bytes}")
    _check(r.weight_sync in ("disk", "nccl"), "rollout.weight_sync", f"must be disk or nccl, got {r.weight_sync!r}")


def _validate_staleness(cfg: TrainConfig) -> None:
    k, a = cfg.trainer.max_staleness, cfg.algorithm
    if k == 0:
        return
    c = a.rollout_correction
    _check(c.rollout_is is not None or c.rollout_rs is not None, "trainer.max_staleness",
           f"{k} trains on batches sampled by older policies; correct the gap with "
           f"algorithm.rollout_correction.rollout_is=token (and/or rollout_rs=sequence)")
    _check(not a.dynamic_sampling, "trainer.max_staleness",
           "dynamic sampling (algorithm.dynamic_sampling) runs its extra rounds in series; use max_staleness=0 with it")


def _validate_logging(log: LoggingConfig) -> None:
    _check(
        log.wandb is None or isinstance(log.wandb, Mapping),
        "logging.wandb",
        f"must be null or a mapping of wandb.init arguments such as {{project: tinyrl, mode: offline}}, "
        f"got {log.wandb!r}",
    )


def _validate_algorithm(a: AlgorithmConfig, r: RolloutConfig) -> None:
    from tinyrl import algorithms

    # A user's function (`module:function`, `file.py:function`) is loaded by `preflight`, before any model.
    _check(
        a.advantage in algorithms.ADVANTAGE_ESTIMATORS or _is_user_code(a.advantage, "algorithm.advantage"),
        "algorithm.advantage",
        f"unknown estimator {a.advantage!r}; choose from {sorted(algorithms.ADVANTAGE_ESTIMATORS)} or give "
        f"'pkg.module:function' or 'path/to/file.py:function'",
    )
    _check(
        a.policy_loss in algorithms.POLICY_LOSSES or _is_user_code(a.policy_loss, "algorithm.policy_loss"),
        "algorithm.policy_loss",
        f"unknown policy loss {a.policy_loss!r}; choose from {sorted(algorithms.POLICY_LOSSES)} or give "
        f"'pkg.module:function' or 'path/to/file.py:function'",
    )
    _check(
        a.loss_agg in algorithms.AGG_MODES,
        "algorithm.loss_agg",
        f"unknown aggregation {a.loss_agg!r}; choose from {sorted(algorithms.AGG_MODES)}",
    )
    _check(
        a.kl_estimator in algorithms.KL_ESTIMATORS,
        "algorithm.kl_estimator",
        f"unknown KL estimator {a.kl_estimator!r}; choose from {sorted(algorithms.KL_ESTIMATORS)}",
    )
    _check(a.kl_coef >= 0, "algorithm.kl_coef", f"must be >= 0, got {a.kl_coef}")
    _check(a.clip_low >= 0 and a.clip_high >= 0, "algorithm.clip_low", "clip ranges must be >= 0")
    _check(a.overlong in ("none", "mask", "soft"), "algorithm.overlong", f"must be none, mask or soft, got {a.overlong!r}")
    _check(a.overlong_buffer >= 0, "algorithm.overlong_buffer", "must be >= 0")
    _check(a.overlong_penalty >= 0, "algorithm.overlong_penalty", f"must be >= 0, got {a.overlong_penalty}")
    _check(0 <= a.gamma <= 1, "algorithm.gamma", "must be in [0, 1]")
    _check(0 <= a.lam <= 1, "algorithm.lam", "must be in [0, 1]")
    _check(a.dynamic_sampling_max_rounds >= 1, "algorithm.dynamic_sampling_max_rounds", "must be >= 1")
    if a.advantage in algorithms.ADVANTAGE_ESTIMATORS:
        check_group_size(algorithms.ADVANTAGE_ESTIMATORS[a.advantage], a, r)
    _validate_rollout_correction(a.rollout_correction)


def check_group_size(estimator, a: AlgorithmConfig, r: RolloutConfig) -> None:
    """A group estimator (one that takes `group_index`) needs groups of two completions or more."""
    import inspect

    _check(
        r.n >= 2 or "group_index" not in inspect.signature(estimator).parameters,
        "rollout.n",
        f"must be >= 2 with the group estimator algorithm.advantage={a.advantage!r} (a group of one completion "
        f"has no baseline to compare with, so every advantage is 0), got {r.n}",
    )


def _is_user_code(spec: str, key: str) -> bool:
    """Whether `spec` points at user code (`pkg.module:name` or `path/to/file.py:name`); a file that does not exist
    is refused here, naming `key`. Importing it is left to `preflight`: user code may register what it needs."""
    if ":" not in spec:
        return False
    where = spec.rpartition(":")[0]
    if where.endswith(".py"):
        _check(os.path.isfile(os.path.expanduser(where)), key, f"no file at {where!r} (from {spec!r})")
    return True


def _validate_rollout_correction(c: RolloutCorrectionConfig) -> None:
    from tinyrl import algorithms

    key = "algorithm.rollout_correction"
    _check(c.rollout_is in algorithms.ROLLOUT_IS_LEVELS, f"{key}.rollout_is",
           f"must be null or token, got {c.rollout_is!r}")
    _check(c.rollout_rs in algorithms.ROLLOUT_RS_LEVELS, f"{key}.rollout_rs",
           f"must be null or sequence, got {c.rollout_rs!r}")
    _check(c.rollout_is_threshold > 0, f"{key}.rollout_is_threshold", f"must be > 0, got {c.rollout_is_threshold}")
    if c.rollout_rs is not None:
        high = c.rollout_rs_threshold if c.rollout_rs_threshold is not None else c.rollout_is_threshold
        _check(high > 0, f"{key}.rollout_rs_threshold", f"must be > 0, got {high}")
        low = c.rollout_rs_threshold_lower if c.rollout_rs_threshold_lower is not None else 1.0 / high
        _check(0 < low <= high, f"{key}.rollout_rs_threshold_lower",
               f"must be in (0, rollout_rs_threshold = {high:g}], got {low:g}")


def _validate_baseline(cfg: TrainConfig) -> None:
    b = cfg.baseline
    if not b.enabled:
        return
    _check(cfg.sft.enabled, "baseline.enabled", "needs sft.enabled: the arms are priced in distillation steps")
    _check(cfg.sft.traces_path is None, "baseline.enabled", "needs the task's own teacher (sft.traces_path null)")
    _check(bool(b.arms), "baseline.arms", "must list at least one arm")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    _check(world_size == 1, "baseline.enabled",
           f"the distillation-only arms run in a single process, and torchrun started {world_size}; run the "
           f"experiment without torchrun or pass baseline.enabled=false")
    for i, arm in enumerate(b.arms):
        _check(arm.start in ("distilled", "base"), f"baseline.arms[{i}].start",
               f"must be 'distilled' or 'base', got {arm.start!r}")


def _validate_distributed(cfg: TrainConfig) -> None:
    d = cfg.distributed
    _check(d.timeout_s > 0, "distributed.timeout_s", f"must be > 0, got {d.timeout_s}")
    _check(
        not d.cpu_offload or cfg.device != "cpu",
        "distributed.cpu_offload",
        "offloads GPU memory to the CPU; it needs a GPU run (device=auto or cuda) under torchrun",
    )


def _validate_task(t: TaskConfig) -> None:
    _check(t.reward_cpu_s >= 0, "task.reward_cpu_s", f"must be >= 0 (0: no limit), got {t.reward_cpu_s}")
    _check(t.reward_memory_mb >= 0, "task.reward_memory_mb", f"must be >= 0 (0: no limit), got {t.reward_memory_mb}")
    _check(
        t.reward_error_limit is None or 0 < t.reward_error_limit <= 1,
        "task.reward_error_limit",
        f"must be in (0, 1] (a share of one step's rewards) or null, got {t.reward_error_limit}",
    )


PACKING_CHOICES = ("auto", "true", "false")
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _validate_packing(cfg: TrainConfig) -> None:
    """trainer.packing and the attention kernel it runs on."""
    import importlib.util

    from tinyrl.devices import FLASH_ATTENTION_PACKAGES, resolve_device

    packing = cfg.trainer.packing
    _check(
        str(packing).lower() in PACKING_CHOICES, "trainer.packing",
        f"must be one of {', '.join(PACKING_CHOICES)}, got {packing!r}",
    )
    name, key = cfg.model.attn_implementation, "model.attn_implementation"
    choices = ", ".join(ATTENTION_IMPLEMENTATIONS)
    _check(name in ATTENTION_IMPLEMENTATIONS, key, f"must be one of {choices}, got {name!r}")
    device = resolve_device(cfg.device)
    if name in FLASH_ATTENTION_PACKAGES:
        _check(device.type == "cuda", key, f"{name} runs on CUDA GPUs only, and device resolves to {device}")
        package = FLASH_ATTENTION_PACKAGES[name]
        _check(importlib.util.find_spec(package) is not None, key, f"{name} needs the {package} package, not installed")
    if name == "flex_attention":
        _check(device.type != "cpu", key, "flex_attention has no backward pass on the CPU; use sdpa there")


def looks_local(path: str) -> bool:
    """A hub name is `org/name`; anything absolute, relative-dotted or existing is a local path."""
    return os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.count("/") != 1


def uses_critic(a: AlgorithmConfig) -> bool:
    return a.advantage == "gae"


def uses_reference(a: AlgorithmConfig) -> bool:
    return a.kl_coef > 0
