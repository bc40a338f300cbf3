"""A whole experiment from a config: `train(config)` and the stages it runs, one small function each.

    experiment_config the config the run runs (a dict over the packaged defaults; on resume, the run's own)
    preflight       what cannot work on this machine fails here, before anything is written or loaded
    load_problems   the task and its training and held-out splits
    prepare_run     the run directory (a used one is refused unless resuming), the checkpoint to continue from
    base_model      the model RL starts from before distillation (the tiny local model when `model.path` is null)
    starting_policy the policy RL starts from: a resumed checkpoint, a distilled model, or the base model
    distil          (tinyrl/sft.py) the supervised warm start, checkpointed and resumable like RL
    rl_trainer      the RL trainer, with a resumed run's state
    run_rl          evaluate, run RL steps (`RLTrainer.fit`), evaluate again
    finish          the final checkpoint, `summary.json` and the curves
    distillation_baselines  (tinyrl/baselines.py, when `baseline.enabled`) distillation-only arms given the RL
                    phase's seconds
    closing         the closing console lines

Under torchrun every rank runs `train`: rank 0 decides the run directory and what to resume and tells the
others; rank 0 alone builds the tiny model, distils (the others wait, then load the distilled weights, so the
distilled model is the one a single process makes), prints and writes records; RL runs on all ranks. The
baseline arms run in a single process only (`validate` refuses them under a torchrun world of more than one).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tinyrl.baselines import distillation_baselines
from tinyrl.checkpoint import latest_checkpoint, load_checkpoint_state
from tinyrl.compose import config_from_dict
from tinyrl.config import ConfigError, TrainConfig, to_config
from tinyrl.console import Console, held_out_line, summary_lines
from tinyrl.devices import resolve_attn_implementation
from tinyrl.distributed import World, init_world
from tinyrl.evaluate import eval_metrics
from tinyrl.metrics import rewind_metrics
from tinyrl.preflight import preflight
from tinyrl.prompts import template_line
from tinyrl.rollout import engine_class
from tinyrl.rundir import (
    CONFIG_FILE, SUMMARY_FILE, changed_on_resume, check_unused, default_run_dir, resume_checkpoint, resume_target,
    resumed_config, resuming, write_json,
)
from tinyrl.sft import distil
from tinyrl.task import TooFewProblems, get_task
from tinyrl.trainer import RLTrainer

# How long other ranks wait for work rank 0 does alone (building the tiny model, distillation). If rank 0
# fails meanwhile, torchrun stops them at once.
MAIN_ONLY_WAIT_S = 24 * 3600.0



@dataclass
class Run:
    """Where a run writes and what it continues from."""

    dir: Path
    resuming: bool
    checkpoint: Path | None  # the RL checkpoint a resumed run continues from
    state: dict | None  # that checkpoint's trainer state


def train(config: TrainConfig | dict | Any) -> dict:
    """Run a whole experiment from a config (dataclass, dict or DictConfig); return the summary written to disk."""
    cfg = experiment_config(config)
    preflight(cfg)
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    world = init_world(cfg.device, cfg.distributed.timeout_s)
    world.check_cpu_offload(cfg.distributed.cpu_offload)
    console = Console(cfg.logging.progress and world.is_main)
    # the console shows each phase itself; transformers' per-file bars for every checkpoint save and model load
    # would interleave with it
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    task, train_rows, eval_rows = load_problems(cfg)
    run = prepare_run(cfg, world, console)
    try:
        with world.reporting_failures():
            if run.state is not None and run.state["step"] >= cfg.trainer.steps:
                summary = _already_finished(cfg, run, world)
                if not (cfg.baseline.enabled and "wall_seconds" in summary and "baseline" not in summary):
                    return summary
                # a finished RL arm whose baseline arms have not finished (killed during them, or enabled since)
                base_path = base_model(cfg, run.dir, task, train_rows, world, console)
            else:
                base_path = base_model(cfg, run.dir, task, train_rows, world, console)
                policy, tokenizer, summary, start_path = starting_policy(
                    cfg, run, base_path, task, train_rows, world, console
                )
                trainer = rl_trainer(cfg, run, world, policy, tokenizer, start_path, task, train_rows, eval_rows)
                after = run_rl(trainer, summary, eval_rows, console)
                summary = finish(cfg, trainer, summary, after, len(eval_rows), started)
                del policy, trainer  # the baseline arms load their own models
            if cfg.baseline.enabled:
                summary = distillation_baselines(cfg, run.dir, base_path, task, train_rows, eval_rows, summary,
                                                 world, console)
            closing(summary, console)
            return summary
    except KeyboardInterrupt as stop:
        raise KeyboardInterrupt(
            f"{stop or 'interrupted'}; to continue, rerun with run_dir={run.dir} resume=true"
        ) from None


def experiment_config(config: TrainConfig | Mapping | DictConfig) -> TrainConfig:
    """The config `train` runs. A plain dict goes over the packaged defaults, as `tinyrl-train` composes them; a
    `TrainConfig` or DictConfig is taken as complete. On resume, every key that differs from the run's saved
    config must be safe to change mid-run (`tinyrl.rundir.SAFE_ON_RESUME`)."""
    if isinstance(config, Mapping) and not isinstance(config, DictConfig):
        return config_from_dict(config)
    cfg = to_config(config)
    resumed = resumed_config(OmegaConf.to_container(OmegaConf.structured(cfg)), None, None)
    return to_config(resumed) if resumed is not None else cfg


def load_problems(cfg: TrainConfig):
    """The task and its training and held-out problem sets (the same for every run seed: `task.data_seed`)."""
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    if cfg.sft.enabled and cfg.sft.traces_path is None and not hasattr(task, "demonstration"):
        raise ConfigError(
            f"sft.traces_path: task {cfg.task.name!r} has no demonstration() to distil from; pass "
            f"sft.traces_path=traces.jsonl or sft.enabled=false"
        )
    engine = engine_class(cfg.rollout.engine, cfg.rollout.layout)
    if getattr(task, "feedback", None) is not None and not engine.environment_feedback:
        raise ConfigError(
            f"rollout.engine: task {cfg.task.name!r} writes into its completions (an environment such as a "
            f"calculator), which the {cfg.rollout.engine} engine cannot do (the hf engine can); pass rollout=hf or "
            f"turn the environment off"
        )
    train_rows = _problems(task, "train", cfg.task.train_size, cfg.task.data_seed, "task.train_size")
    eval_rows = _problems(task, cfg.task.eval_split, cfg.task.eval_size, cfg.task.data_seed, "task.eval_size")
    return task, train_rows, eval_rows


def _problems(task, split: str, size: int, seed: int, size_key: str) -> list[dict]:
    try:
        return task.dataset(split, size, seed)
    except TooFewProblems as err:
        raise ConfigError(f"{size_key}: {err}") from None


def prepare_run(cfg: TrainConfig, world: World, console: Console) -> Run:
    """Decide the run directory and the checkpoint to resume from; save the config the run uses.

    Rank 0 decides and writes; every rank gets its decision.
    """
    decision = None
    if world.is_main:
        run_dir = resume_target(cfg) or default_run_dir(cfg)
        if not resuming(cfg.resume):
            check_unused(run_dir)
        else:
            for change in changed_on_resume(run_dir, cfg):
                console.say(f"resume: {change}")
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = resume_checkpoint(cfg, run_dir)
        (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        state = load_checkpoint_state(checkpoint) if checkpoint is not None else None
        verb = f"resuming from {checkpoint.name}" if checkpoint is not None else "run directory"
        console.say(f"{verb}: {run_dir}")
        decision = Run(run_dir, resuming(cfg.resume), checkpoint, state)
    return world.broadcast(decision)


def base_model(cfg: TrainConfig, run_dir: Path, task, train_rows: list[dict], world: World,
               console: Console) -> str:
    """`model.path`, or a tiny Qwen2 and tokenizer built in `run_dir/base_model` from the task's own text
    (by rank 0; the other ranks wait for it)."""
    from tinyrl.models import build_tiny_model

    if cfg.model.path is not None:
        return cfg.model.path
    base_path = run_dir / "base_model"
    if world.is_main and not (base_path / "config.json").exists():
        corpus_rows = train_rows[: cfg.model.tiny.corpus_problems]
        demonstration = getattr(task, "demonstration", lambda row: None)
        tiny = cfg.model.tiny
        with console.phase(f"building a tiny Qwen2 and its tokenizer from {len(corpus_rows)} training problems"):
            texts = [task.prompt(r) for r in corpus_rows] + [d for d in map(demonstration, corpus_rows) if d]
            build_tiny_model(
                base_path, texts, vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size,
                num_layers=tiny.num_layers, num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
                intermediate_size=tiny.intermediate_size,
                max_position_embeddings=cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens + 64,
                seed=cfg.seed,
            )
    world.barrier("building the tiny model on rank 0", timeout_s=MAIN_ONLY_WAIT_S)
    return str(base_path)


def starting_policy(cfg: TrainConfig, run: Run, base_path: str, task, train_rows: list[dict], world: World,
                    console: Console):
    """The policy RL starts from, its tokenizer, the summary so far, and where reference and critic start.

    A resumed run continues from its checkpoint; a run whose distillation already finished reuses `sft_model/`;
    otherwise the base model is loaded and, when `sft.enabled`, distilled first (on rank 0 alone, continuing
    from a resumed run's distillation checkpoint; the other ranks wait and then load what it saved).
    """
    from tinyrl.models import load_policy

    attention = resolve_attn_implementation(cfg.model.attn_implementation, world.device)
    sft_dir = run.dir / "sft_model"
    summary: dict[str, Any] = {}

    def load(source: Path | str, device):
        with console.phase(f"loading the policy from {source} on {device}"):
            policy, tokenizer = load_policy(source, device=device, attn_implementation=attention)
        console.say(template_line(task, train_rows[0], tokenizer, cfg.model.template))
        return policy, tokenizer

    if run.checkpoint is not None:
        # with LoRA the checkpoint's actor/ is the merged model; the run continues from its start weights and the
        # checkpoint's adapter/ (RLTrainer.resume), which gives back the frozen base and the adapters exactly
        lora_start = sft_dir if (cfg.sft.enabled and sft_dir.exists()) else Path(base_path)
        policy, tokenizer = load(lora_start if cfg.model.lora.enabled else run.checkpoint / "actor", world.load_device)
        summary.update(run.state.get("extra", {}).get("summary", {}))
    elif cfg.sft.enabled and (sft_dir / "config.json").exists():
        policy, tokenizer = load(sft_dir, world.load_device)
        summary.update(json.loads((run.dir / "sft_summary.json").read_text()))
    elif cfg.sft.enabled:
        if world.is_main:
            checkpoint = latest_checkpoint(run.dir / "sft") if run.resuming else None
            policy, tokenizer = load(checkpoint / "actor" if checkpoint is not None else base_path, world.device)
            summary.update(distil(cfg, run.dir, policy, tokenizer, task, train_rows, world.device, checkpoint,
                                  console))
        world.barrier("distillation on rank 0", timeout_s=MAIN_ONLY_WAIT_S)
        if not world.is_main:
            policy, tokenizer = load_policy(sft_dir, device=world.load_device, attn_implementation=attention)
            summary.update(json.loads((run.dir / "sft_summary.json").read_text()))
    else:
        policy, tokenizer = load(base_path, world.load_device)
    start_path = sft_dir if (cfg.sft.enabled and sft_dir.exists()) else Path(base_path)
    return policy, tokenizer, summary, start_path


def rl_trainer(cfg: TrainConfig, run: Run, world: World, policy, tokenizer, start_path: Path, task, train_rows,
               eval_rows) -> RLTrainer:
    """The RL trainer over the starting policy; a resumed run gets its checkpoint's state, and the metrics rows
    written after that checkpoint are set aside."""
    if run.state is not None and world.is_main:
        rewind_metrics(run.dir, run.state["metrics_offset"])
    trainer = RLTrainer.from_config(
        cfg, run_dir=run.dir, policy=policy, tokenizer=tokenizer, start_path=start_path,
        critic_path=run.checkpoint / "critic" if run.checkpoint is not None else None,
        task=task, train_rows=train_rows, eval_rows=eval_rows, fresh_run=False,  # prepare_run made the directory
    )
    if run.state is not None:
        trainer.resume(run.checkpoint, run.state)
    return trainer


def run_rl(trainer: RLTrainer, summary: dict, eval_rows: list[dict], console: Console) -> dict:
    """Evaluate the starting policy (once per run), run RL to `trainer.steps`, evaluate the result.

    Every evaluation of a run is on the same held-out problems: a resumed run whose problems differ from those
    measured before RL (a changed task) is refused rather than compared.
    """
    problems = _fingerprint(eval_rows)
    if summary.get("eval_set", problems) != problems:
        raise ConfigError(
            "task: the held-out problems differ from those this run measured before RL (the task's code or data "
            "changed?); start a new run to measure on them"
        )
    try:
        if "accuracy_before_rl" not in summary:
            before = _evaluate(trainer, 0, "before RL", console)
            summary.update(accuracy_before_rl=before["accuracy"], eval_before_rl=before, eval_set=problems)
            trainer.metrics.write(0, eval_metrics(before))
        trainer.extra_state["summary"] = summary
        if trainer.cfg.trainer.steps > trainer.step_count:
            t, left = trainer.cfg.trainer, trainer.cfg.trainer.steps - trainer.step_count
            console.say(f"RL: {trainer.cfg.algorithm.name}, {left} step{'s' * (left != 1)} of {t.prompts_per_step} "
                        f"prompts x {trainer.cfg.rollout.n} completions (train figures: the step's own samples)")
        trainer.fit()
        if trainer.step_count == 0:
            return summary["eval_before_rl"]  # no RL step: the policy is the one just measured
        after = _evaluate(trainer, trainer.step_count, "after RL", console)
        trainer.metrics.write(trainer.step_count, eval_metrics(after))
        return after
    finally:
        trainer.scorer.close()


def _evaluate(trainer: RLTrainer, step: int, when: str, console: Console) -> dict:
    with console.phase(f"held-out evaluation {when} on {len(trainer.eval_rows)} problems") as ended:
        result = trainer.evaluate(step)
        ended(held_out_line(when, result))
    return result


def _fingerprint(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finish(cfg: TrainConfig, trainer: RLTrainer, summary: dict, after: dict, eval_problems: int,
           started: float) -> dict:
    """Write the final checkpoint, `curves.png` (when the trainer closes) and `summary.json` (rank 0); return the
    summary."""
    from tinyrl.reward_report import reward_error_summary

    summary.update(
        accuracy_after_rl=after["accuracy"],
        eval_after_rl=after,
        eval_problems=eval_problems,
        eval_split=cfg.task.eval_split,
        rl_steps=trainer.step_count,
        wall_seconds=summary.get("wall_seconds", 0.0) + (time.perf_counter() - started),
        cpu_seconds=_cpu_seconds(),
        run_dir=str(trainer.run_dir),
        reward_errors=reward_error_summary(trainer.run_dir),  # {} when no reward failed or printed an error
    )
    summary = trainer.world.broadcast(summary)  # rank 0's clock
    trainer.extra_state["summary"] = summary
    trainer.save()
    trainer.close()
    if trainer.world.is_main:
        write_json(trainer.run_dir / SUMMARY_FILE, summary)
    return summary


def closing(summary: dict, console: Console) -> None:
    """The closing lines: held-out accuracy before and after RL, the baseline arms if run, the files to open."""
    for line in summary_lines(summary):
        console.say(line)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (reward workers) so far."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _already_finished(cfg: TrainConfig, run: Run, world: World) -> dict:
    summary_path = run.dir / SUMMARY_FILE
    message = f"run in {run.dir} already finished {run.state['step']} of {cfg.trainer.steps} steps; nothing to resume"
    result = None
    if world.is_main:
        print(message)
        result = json.loads(summary_path.read_text()) if summary_path.exists() else {"message": message}
    return world.broadcast(result)
