"""Typed configuration for training runs, and its validation.

The dataclasses below are the schema of the Hydra config tree in `conf/` (registered in Hydra's ConfigStore as
`train_schema`), so a wrong type or an unknown key fails when the config is composed, naming the key. `validate`
adds the checks a type cannot express (ranges, divisibility, paths) and runs before any model is loaded.

Batch sizes, each with one meaning:
- `trainer.prompts_per_step`: problems sampled per RL step; each gets `rollout.n` completions.
- `trainer.prompts_per_mini_batch`: problems (with all their completions) per optimizer step; must divide
  `prompts_per_step`, so one RL step makes `ppo_epochs * prompts_per_step / prompts_per_mini_batch` optimizer steps.
- `trainer.micro_batch_tokens`: padded tokens per forward/backward pass (a memory knob only; it never changes the
  gradient, because losses are normalised over the whole mini-batch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


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
class ModelConfig:
    path: Optional[str] = None  # local dir or hub name of the policy; null builds the tiny model in the run dir
    critic_path: Optional[str] = None  # null: the critic starts from the policy's weights (PPO only)
    template: str = "base"  # base: the task's raw prompt; chat: the tokenizer's chat template
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU; or float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TaskConfig:
    name: str = "countdown"  # registered name, "pkg.module:Class" or "path/to/file.py:Class"
    kwargs: dict = field(default_factory=dict)
    train_size: int = 20000  # problems in the training split the sampler cycles through
    data_seed: int = 0  # seeds the problem sets, kept apart from `seed` so every run seed sees the same eval set
    eval_split: str = "test"
    eval_size: int = 500
    reward_workers: int = 2  # processes scoring completions; 0 scores in-process (no time limit)
    reward_timeout_s: float = 5.0


@dataclass
class AlgorithmConfig:
    """An algorithm preset (see conf/algorithm/*.yaml): estimator, loss, KL and shaping choices."""

    name: str = "grpo"
    advantage: str = "grpo"
    norm_by_std: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    policy_loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    loss_agg: str = "token-mean"
    loss_agg_normalizer: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    value_clip: float = 0.5
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    overlong: str = "none"  # none | mask | soft
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf (transformers, any device) | vllm
    n: int = 8  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    batch_size: int = 512  # hf engine: sequences decoded together
    gpu_memory_utilization: float = 0.5  # vllm
    timeout_s: float = 1800.0  # generation or weight sync taking longer raises instead of hanging


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


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: Optional[dict] = None  # e.g. {project: tinyrl, mode: offline}
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
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def register_configs() -> None:
    """Register the schema with Hydra so `conf/train.yaml` composes onto typed nodes, and the resolver that makes
    Hydra's output directory the run directory when `run_dir` is given."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("tinyrl_or"):
        OmegaConf.register_new_resolver("tinyrl_or", lambda value, default: value if value else default)


def to_config(config: TrainConfig | DictConfig | dict) -> TrainConfig:
    """Turn a dataclass, dict or DictConfig into a validated `TrainConfig` object."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, config)
    except Exception as err:  # omegaconf names the key in its message
        raise ConfigError(f"invalid config: {err}") from err
    cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


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
        ("task.reward_workers", cfg.task.reward_workers),
        ("sft.steps", s.steps),
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
    _check(r.engine in ("hf", "vllm"), "rollout.engine", f"must be 'hf' or 'vllm', got {r.engine!r}")
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
    _check(r.timeout_s > 0, "rollout.timeout_s", f"must be > 0, got {r.timeout_s}")
    _check(cfg.task.reward_timeout_s > 0, "task.reward_timeout_s", "must be > 0")
    _check(m.template in ("base", "chat"), "model.template", f"must be 'base' or 'chat', got {m.template!r}")
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
    if m.path is not None and _looks_local(m.path):
        _check(os.path.isdir(m.path), "model.path", f"no model directory at {m.path!r}")
    if m.critic_path is not None and _looks_local(m.critic_path):
        _check(os.path.isdir(m.critic_path), "model.critic_path", f"no model directory at {m.critic_path!r}")
    if s.enabled and s.traces_path is not None:
        _check(os.path.isfile(s.traces_path), "sft.traces_path", f"no file at {s.traces_path!r}")
    if s.enabled:
        _check(s.batch_size >= 1, "sft.batch_size", f"must be >= 1, got {s.batch_size}")
        _check(s.lr > 0, "sft.lr", f"must be > 0, got {s.lr}")
        _check(s.num_traces >= 1, "sft.num_traces", f"must be >= 1, got {s.num_traces}")
    _validate_algorithm(a)
    _validate_baseline(cfg)
    if m.path is None:
        tiny = m.tiny
        _check(
            tiny.hidden_size % tiny.num_heads == 0 and tiny.hidden_size // tiny.num_heads >= 32,
            "model.tiny.hidden_size",
            f"hidden_size / num_heads must be an integer >= 32 (got {tiny.hidden_size} / {tiny.num_heads})",
        )


def _validate_algorithm(a: AlgorithmConfig) -> None:
    from tinyrl import algorithms

    _check(
        a.advantage in algorithms.ADVANTAGE_ESTIMATORS,
        "algorithm.advantage",
        f"unknown estimator {a.advantage!r}; choose from {sorted(algorithms.ADVANTAGE_ESTIMATORS)}",
    )
    _check(
        a.policy_loss in algorithms.POLICY_LOSSES,
        "algorithm.policy_loss",
        f"unknown policy loss {a.policy_loss!r}; choose from {sorted(algorithms.POLICY_LOSSES)}",
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
    _check(0 <= a.gamma <= 1, "algorithm.gamma", "must be in [0, 1]")
    _check(0 <= a.lam <= 1, "algorithm.lam", "must be in [0, 1]")
    _check(a.dynamic_sampling_max_rounds >= 1, "algorithm.dynamic_sampling_max_rounds", "must be >= 1")


def _validate_baseline(cfg: TrainConfig) -> None:
    b = cfg.baseline
    if not b.enabled:
        return
    _check(cfg.sft.enabled, "baseline.enabled", "needs sft.enabled: the arms are priced in distillation steps")
    _check(cfg.sft.traces_path is None, "baseline.enabled", "needs the task's own teacher (sft.traces_path null)")
    _check(bool(b.arms), "baseline.arms", "must list at least one arm")
    for i, arm in enumerate(b.arms):
        _check(arm.start in ("distilled", "base"), f"baseline.arms[{i}].start",
               f"must be 'distilled' or 'base', got {arm.start!r}")


def _looks_local(path: str) -> bool:
    """A hub name is `org/name`; anything absolute, relative-dotted or existing is a local path."""
    return os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.count("/") != 1


def uses_critic(a: AlgorithmConfig) -> bool:
    return a.advantage == "gae"


def uses_reference(a: AlgorithmConfig) -> bool:
    return a.kl_coef > 0
