"""A whole experiment from a config: `train(config)` and the stages it runs, one small function each.

    prepare_run     the run directory, the checkpoint a resumed run continues from, the saved config
    load_problems   the task and its training and held-out splits
    base_model      the model RL starts from before distillation (the tiny local model when `model.path` is null)
    starting_policy the policy RL starts from: a resumed checkpoint, a distilled model, or the base model
    run_rl          evaluate, run RL steps (`RLTrainer.fit`), evaluate again
    finish          the final checkpoint, `summary.json` and the curves

Under torchrun every rank runs `train`: rank 0 decides the run directory and what to resume and tells the
others; rank 0 alone builds the tiny model, distils (the others wait, then load the distilled weights, so the
distilled model is the one a single process makes) and writes records; RL runs on all ranks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from tinyrl.checkpoint import load_checkpoint_state
from tinyrl.config import TrainConfig, to_config
from tinyrl.devices import resolve_dtype
from tinyrl.distributed import World, init_world
from tinyrl.evaluate import eval_metrics
from tinyrl.metrics import MetricsWriter, rewind_metrics
from tinyrl.rundir import default_run_dir, resume_checkpoint, resume_target
from tinyrl.task import get_task
from tinyrl.trainer import RLTrainer

log = logging.getLogger("tinyrl")

# How long other ranks wait for work rank 0 does alone (building the tiny model, distillation). If rank 0
# fails meanwhile, torchrun stops them at once.
MAIN_ONLY_WAIT_S = 24 * 3600.0


@dataclass
class Run:
    """Where a run writes and what it continues from."""

    dir: Path
    checkpoint: Path | None  # the checkpoint a resumed run continues from
    state: dict | None  # that checkpoint's trainer state


def train(config: TrainConfig | dict | Any) -> dict:
    """Run a whole experiment from a config (dataclass, dict or DictConfig); return the summary written to disk."""
    cfg = to_config(config)
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    world = init_world(cfg.device, cfg.distributed.timeout_s)
    world.check_cpu_offload(cfg.distributed.cpu_offload)
    with world.reporting_failures():
        run = prepare_run(cfg, world)
        task, train_rows, eval_rows = load_problems(cfg)
        if run.state is not None and run.state["step"] >= cfg.trainer.steps:
            return _already_finished(cfg, run, world)
        base_path = base_model(cfg, run.dir, task, train_rows, world)
        policy, tokenizer, summary, start_path = starting_policy(cfg, run, base_path, task, train_rows, world)
        if run.state is not None and world.is_main:
            rewind_metrics(run.dir, run.state["metrics_offset"])
        trainer = RLTrainer.from_config(
            cfg, run_dir=run.dir, policy=policy, tokenizer=tokenizer, start_path=start_path,
            critic_path=run.checkpoint / "critic" if run.checkpoint is not None else None,
            task=task, train_rows=train_rows, eval_rows=eval_rows,
        )
        if run.state is not None:
            trainer.resume(run.checkpoint, run.state)
        after = run_rl(trainer, summary)
        return finish(cfg, trainer, summary, after, len(eval_rows), started)


def prepare_run(cfg: TrainConfig, world: World | None = None) -> Run:
    """Decide the run directory and the checkpoint to resume from; save the config the run uses.

    Rank 0 decides and writes; every rank gets its decision.
    """
    world = world or init_world(cfg.device, cfg.distributed.timeout_s)
    decision = None
    if world.is_main:
        run_dir = resume_target(cfg) or default_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = resume_checkpoint(cfg, run_dir)
        if checkpoint is not None and checkpoint.parent.parent != run_dir:
            run_dir = checkpoint.parent.parent
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        state = load_checkpoint_state(checkpoint) if checkpoint is not None else None
        decision = Run(run_dir, checkpoint, state)
    return world.broadcast(decision)


def load_problems(cfg: TrainConfig):
    """The task and its training and held-out problem sets (the same for every run seed: `task.data_seed`)."""
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    train_rows = task.dataset("train", cfg.task.train_size, cfg.task.data_seed)
    eval_rows = task.dataset(cfg.task.eval_split, cfg.task.eval_size, cfg.task.data_seed)
    return task, train_rows, eval_rows


def base_model(cfg: TrainConfig, run_dir: Path, task, train_rows: list[dict], world: World | None = None) -> str:
    """`model.path`, or a tiny Qwen2 and tokenizer built in `run_dir/base_model` from the task's own text
    (by rank 0; the other ranks wait for it)."""
    from tinyrl.models import build_tiny_model

    if cfg.model.path is not None:
        return cfg.model.path
    world = world or init_world(cfg.device, cfg.distributed.timeout_s)
    base_path = run_dir / "base_model"
    if world.is_main and not (base_path / "config.json").exists():
        corpus_rows = train_rows[: cfg.model.tiny.corpus_problems]
        demonstration = getattr(task, "demonstration", lambda row: None)
        texts = [task.prompt(r) for r in corpus_rows] + [d for d in map(demonstration, corpus_rows) if d]
        tiny = cfg.model.tiny
        build_tiny_model(
            base_path, texts, vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size, num_layers=tiny.num_layers,
            num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads, intermediate_size=tiny.intermediate_size,
            max_position_embeddings=cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens + 64,
            seed=cfg.seed,
        )
    world.barrier("building the tiny model on rank 0", timeout_s=MAIN_ONLY_WAIT_S)
    return str(base_path)


def starting_policy(cfg: TrainConfig, run: Run, base_path: str, task, train_rows: list[dict], world: World | None = None):
    """The policy RL starts from, its tokenizer, the summary so far, and where reference and critic start.

    A resumed run continues from its checkpoint; a run whose distillation already finished reuses `sft_model/`;
    otherwise the base model is loaded and, when `sft.enabled`, distilled first (on rank 0 alone: the other
    ranks wait and then load what it saved).
    """
    from tinyrl.models import load_policy

    world = world or init_world(cfg.device, cfg.distributed.timeout_s)
    device = world.load_device
    sft_dir = run.dir / "sft_model"
    summary: dict[str, Any] = {}
    if run.checkpoint is not None:
        policy, tokenizer = load_policy(run.checkpoint / "actor", device=device)
        summary.update(run.state.get("extra", {}).get("summary", {}))
    elif cfg.sft.enabled and (sft_dir / "config.json").exists():
        policy, tokenizer = load_policy(sft_dir, device=device)
        summary.update(json.loads((run.dir / "sft_summary.json").read_text()))
    elif cfg.sft.enabled:
        if world.is_main:
            policy, tokenizer = load_policy(base_path, device=world.device)
            summary.update(distil(cfg, run.dir, policy, tokenizer, task, train_rows, world.device))
        world.barrier("distillation on rank 0", timeout_s=MAIN_ONLY_WAIT_S)
        if not world.is_main:
            policy, tokenizer = load_policy(sft_dir, device=device)
            summary.update(json.loads((run.dir / "sft_summary.json").read_text()))
    else:
        policy, tokenizer = load_policy(base_path, device=device)
    start_path = sft_dir if (cfg.sft.enabled and sft_dir.exists()) else Path(base_path)
    return policy, tokenizer, summary, start_path


def distil(cfg: TrainConfig, run_dir: Path, policy, tokenizer, task, train_rows: list[dict], device: torch.device) -> dict:
    """Supervised warm start on teacher traces; saves `sft_model/` atomically and returns its summary."""
    from tinyrl.sft import read_traces, run_sft, task_traces, tokenize_traces

    if cfg.sft.traces_path:
        pairs = read_traces(cfg.sft.traces_path, tokenizer)
    else:
        pairs = task_traces(task, train_rows[: cfg.sft.num_traces], tokenizer, cfg.model.template)
    examples = tokenize_traces(pairs, tokenizer, cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens)
    sft_log = MetricsWriter(run_dir / "sft")
    summary = run_sft(
        policy, examples, cfg.sft, pad_id=tokenizer.pad_token_id, seed=cfg.seed, device=device,
        dtype=resolve_dtype(cfg.model.dtype, device), micro_batch_tokens=cfg.trainer.micro_batch_tokens,
        log=sft_log.write,
    )
    sft_log.close()
    sft_dir, staging = run_dir / "sft_model", run_dir / "sft_model.tmp"
    policy.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    os.replace(staging, sft_dir)
    (run_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_rl(trainer: RLTrainer, summary: dict) -> dict:
    """Evaluate the starting policy (once per run), run RL to `trainer.steps`, evaluate the result."""
    try:
        if "accuracy_before_rl" not in summary:
            before = trainer.evaluate(0)
            summary["accuracy_before_rl"] = before["accuracy"]
            summary["eval_before_rl"] = before
            trainer.metrics.write(0, eval_metrics(before))
        trainer.extra_state["summary"] = summary
        trainer.fit()
        if trainer.step_count == 0:
            return summary["eval_before_rl"]  # no RL step: the policy is the one just measured
        after = trainer.evaluate(trainer.step_count)
        trainer.metrics.write(trainer.step_count, eval_metrics(after))
        return after
    finally:
        trainer.scorer.close()


def finish(cfg: TrainConfig, trainer: RLTrainer, summary: dict, after: dict, eval_problems: int, started: float) -> dict:
    """Write the final checkpoint, `summary.json` and `curves.png` (rank 0); return the summary."""
    summary.update(
        accuracy_after_rl=after["accuracy"],
        eval_after_rl=after,
        eval_problems=eval_problems,
        eval_split=cfg.task.eval_split,
        rl_steps=trainer.step_count,
        wall_seconds=summary.get("wall_seconds", 0.0) + (time.perf_counter() - started),
        run_dir=str(trainer.run_dir),
    )
    summary = trainer.world.broadcast(summary)  # rank 0's clock
    trainer.extra_state["summary"] = summary
    trainer.save()
    trainer.close()
    if trainer.world.is_main:
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.logging.plot:
            from tinyrl.plots import plot_run

            plot_run(trainer.run_dir)
    return summary


def _already_finished(cfg: TrainConfig, run: Run, world: World) -> dict:
    summary_path = run.dir / "summary.json"
    message = f"run in {run.dir} already finished {run.state['step']} of {cfg.trainer.steps} steps; nothing to resume"
    result = None
    if world.is_main:
        log.warning(message)
        print(message)
        result = json.loads(summary_path.read_text()) if summary_path.exists() else {"message": message}
    return world.broadcast(result)
