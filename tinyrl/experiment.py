"""A whole experiment from a config: `train(config)` and the stages it runs, one small function each.

    prepare_run     the run directory, the checkpoint a resumed run continues from, the saved config
    load_problems   the task and its training and held-out splits
    base_model      the model RL starts from before distillation (the tiny local model when `model.path` is null)
    starting_policy the policy RL starts from: a resumed checkpoint, a distilled model, or the base model
    run_rl          evaluate, run RL steps (`RLTrainer.fit`), evaluate again
    finish          the final checkpoint, `summary.json` and the curves
    distillation_baselines  (when `baseline.enabled`) distillation-only arms given the RL phase's seconds
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from tinyrl.checkpoint import load_checkpoint_state
from tinyrl.config import TrainConfig, to_config
from tinyrl.devices import resolve_device, resolve_dtype
from tinyrl.evaluate import eval_metrics
from tinyrl.metrics import MetricsWriter, read_metrics, rewind_metrics
from tinyrl.rundir import default_run_dir, resume_checkpoint, resume_target
from tinyrl.task import get_task
from tinyrl.trainer import RLTrainer

log = logging.getLogger("tinyrl")


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
    run = prepare_run(cfg)
    task, train_rows, eval_rows = load_problems(cfg)
    base_path = base_model(cfg, run.dir, task, train_rows)
    if run.state is not None and run.state["step"] >= cfg.trainer.steps:
        summary = _already_finished(cfg, run)
        if cfg.baseline.enabled and "wall_seconds" in summary and "baseline" not in summary:
            summary = distillation_baselines(cfg, run.dir, base_path, task, train_rows, eval_rows, summary)
        return summary
    policy, tokenizer, summary, start_path = starting_policy(cfg, run, base_path, task, train_rows)
    trainer = RLTrainer.from_config(
        cfg, run_dir=run.dir, policy=policy, tokenizer=tokenizer, start_path=start_path,
        critic_path=run.checkpoint / "critic" if run.checkpoint is not None else None,
        task=task, train_rows=train_rows, eval_rows=eval_rows,
    )
    if run.state is not None:
        rewind_metrics(run.dir, run.state["metrics_offset"])
        trainer.metrics.close()
        trainer.metrics = MetricsWriter(run.dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb)
        trainer.load_state_dict(run.state)
    after = run_rl(trainer, summary)
    summary = finish(cfg, trainer, summary, after, len(eval_rows), started)
    if cfg.baseline.enabled:
        summary = distillation_baselines(cfg, run.dir, base_path, task, train_rows, eval_rows, summary)
    return summary


def prepare_run(cfg: TrainConfig) -> Run:
    """Decide the run directory and the checkpoint to resume from; save the config the run uses."""
    run_dir = resume_target(cfg) or default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_checkpoint(cfg, run_dir)
    if checkpoint is not None and checkpoint.parent.parent != run_dir:
        run_dir = checkpoint.parent.parent
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    state = load_checkpoint_state(checkpoint) if checkpoint is not None else None
    return Run(run_dir, checkpoint, state)


def load_problems(cfg: TrainConfig):
    """The task and its training and held-out problem sets (the same for every run seed: `task.data_seed`)."""
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    train_rows = task.dataset("train", cfg.task.train_size, cfg.task.data_seed)
    eval_rows = task.dataset(cfg.task.eval_split, cfg.task.eval_size, cfg.task.data_seed)
    return task, train_rows, eval_rows


def base_model(cfg: TrainConfig, run_dir: Path, task, train_rows: list[dict]) -> str:
    """`model.path`, or a tiny Qwen2 and tokenizer built in `run_dir/base_model` from the task's own text."""
    from tinyrl.models import build_tiny_model

    if cfg.model.path is not None:
        return cfg.model.path
    base_path = run_dir / "base_model"
    if not (base_path / "config.json").exists():
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
    return str(base_path)


def starting_policy(cfg: TrainConfig, run: Run, base_path: str, task, train_rows: list[dict]):
    """The policy RL starts from, its tokenizer, the summary so far, and where reference and critic start.

    A resumed run continues from its checkpoint; a run whose distillation already finished reuses `sft_model/`;
    otherwise the base model is loaded and, when `sft.enabled`, distilled first.
    """
    from tinyrl.models import load_policy

    device = resolve_device(cfg.device)
    sft_dir = run.dir / "sft_model"
    summary: dict[str, Any] = {}
    if run.checkpoint is not None:
        policy, tokenizer = load_policy(run.checkpoint / "actor", device=device)
        summary.update(run.state.get("extra", {}).get("summary", {}))
    elif cfg.sft.enabled and (sft_dir / "config.json").exists():
        policy, tokenizer = load_policy(sft_dir, device=device)
        summary.update(json.loads((run.dir / "sft_summary.json").read_text()))
    else:
        policy, tokenizer = load_policy(base_path, device=device)
        if cfg.sft.enabled:
            summary.update(distil(cfg, run.dir, policy, tokenizer, task, train_rows))
    start_path = sft_dir if (cfg.sft.enabled and sft_dir.exists()) else Path(base_path)
    return policy, tokenizer, summary, start_path


def distil(
    cfg: TrainConfig, run_dir: Path, policy, tokenizer, task, train_rows: list[dict], *, steps: int | None = None,
    out_name: str = "sft_model", log_name: str = "sft",
) -> dict:
    """Supervised warm start on teacher traces (`steps`, default `sft.steps`); saves `run_dir/out_name/`
    atomically and returns its summary (also written to `run_dir/sft_summary.json` for the main model)."""
    from tinyrl.sft import read_traces, run_sft, task_traces, tokenize_traces

    device = resolve_device(cfg.device)
    if cfg.sft.traces_path:
        pairs = read_traces(cfg.sft.traces_path, tokenizer)
    else:
        pairs = task_traces(task, train_rows[: cfg.sft.num_traces], tokenizer, cfg.model.template)
    examples = tokenize_traces(pairs, tokenizer, cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens)
    out_dir, staging = run_dir / out_name, run_dir / f"{out_name}.tmp"
    sft_log = MetricsWriter(run_dir / log_name)
    summary = run_sft(
        policy, examples, replace(cfg.sft, steps=cfg.sft.steps if steps is None else steps), pad_id=tokenizer.pad_token_id,
        seed=cfg.seed, device=device, dtype=resolve_dtype(cfg.model.dtype, device),
        micro_batch_tokens=cfg.trainer.micro_batch_tokens, log=sft_log.write,
    )
    sft_log.close()
    policy.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    if out_name == "sft_model":
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
    """Write the final checkpoint, `summary.json` and `curves.png`; return the summary."""
    summary.update(
        accuracy_after_rl=after["accuracy"],
        eval_after_rl=after,
        eval_problems=eval_problems,
        eval_split=cfg.task.eval_split,
        rl_steps=trainer.step_count,
        wall_seconds=summary.get("wall_seconds", 0.0) + (time.perf_counter() - started),
        cpu_seconds=_cpu_seconds(),
        run_dir=str(trainer.run_dir),
    )
    trainer.extra_state["summary"] = summary
    trainer.save()
    trainer.close()
    _write_summary(trainer.run_dir, summary)
    if cfg.logging.plot:
        from tinyrl.plots import plot_run

        plot_run(trainer.run_dir)
    return summary


def rl_phase_seconds(run_dir: Path) -> float:
    """Seconds the RL steps took, from `metrics.jsonl`: every phase of every step except evaluation (the last row
    of each step counts, should a step have been written twice)."""
    steps = {row["step"]: row for row in read_metrics(run_dir) if "reward/mean" in row}
    return sum(v or 0.0 for row in steps.values() for k, v in row.items() if k.startswith("time/") and k != "time/evaluate")


def distillation_baselines(
    cfg: TrainConfig, run_dir: Path, base_path: str, task, train_rows: list[dict], eval_rows: list[dict], summary: dict
) -> dict:
    """Distillation-only arms in the RL arm's time, greedy-evaluated on the same held-out problems.

    Each arm of `baseline.arms` distils with its own teacher (`task.kwargs` updated by the arm's `task_kwargs`) on
    the same training problems: from `sft_model/` for as many distillation steps as the RL phase's seconds buy at
    the measured seconds per distillation step (`start: distilled`), or from the base model for the distillation
    steps plus those (`start: base`). The RL arm's final policy is answered again on the same problems, so each
    arm's gap to it comes with the standard error of a paired difference: se = std(d_i) / sqrt(n), d_i = c_rl,i -
    c_arm,i for per-problem correctness c. Results go into `summary.json` under `baseline`; models under `baselines/`.
    """
    from tinyrl.checkpoint import latest_checkpoint
    from tinyrl.models import load_policy
    from tinyrl.task import RewardScorer

    device = resolve_device(cfg.device)
    rl_seconds = rl_phase_seconds(run_dir)
    per_step = summary["sft_seconds"] / max(1, summary["sft_steps"])
    extra_steps = max(1, round(rl_seconds / per_step))
    (run_dir / "baselines").mkdir(exist_ok=True)
    arms = []
    with RewardScorer(task, workers=cfg.task.reward_workers, timeout=cfg.task.reward_timeout_s) as scorer:
        final, _ = load_policy(latest_checkpoint(run_dir) / "actor", device=device)
        rl_correct = _greedy_correct(cfg, final, load_policy(run_dir / "sft_model")[1], task, eval_rows, scorer)
        for i, arm in enumerate(cfg.baseline.arms):
            teacher = get_task(cfg.task.name, **{**cfg.task.kwargs, **arm.task_kwargs})
            start = run_dir / "sft_model" if arm.start == "distilled" else Path(base_path)
            steps = extra_steps if arm.start == "distilled" else summary["sft_steps"] + extra_steps
            policy, tokenizer = load_policy(start, device=device)
            name = f"baselines/arm{i}"
            trained = distil(cfg, run_dir, policy, tokenizer, teacher, train_rows, steps=steps, out_name=name,
                             log_name=f"{name}_sft")
            correct = _greedy_correct(cfg, policy, tokenizer, task, eval_rows, scorer)
            diffs = [float(a) - float(b) for a, b in zip(rl_correct, correct)]
            arms.append({
                "name": arm.name, "task_kwargs": dict(arm.task_kwargs), "start": arm.start, "steps": steps,
                "sft_seconds": trained["sft_seconds"], "accuracy": sum(correct) / len(correct),
                "rl_gain": sum(diffs) / len(diffs), "rl_gain_se": _standard_error(diffs),
            })
            log.info("baseline %r: %d distillation steps, accuracy %.3f", arm.name, steps, arms[-1]["accuracy"])
    best = max(arms, key=lambda a: a["accuracy"])
    summary["baseline"] = {
        "rl_seconds": rl_seconds, "sft_seconds_per_step": per_step, "extra_steps": extra_steps, "arms": arms,
        "rl_accuracy_rechecked": sum(rl_correct) / len(rl_correct), "best": best["name"],
        "best_accuracy": best["accuracy"], "rl_gain_over_best": best["rl_gain"], "rl_gain_over_best_se": best["rl_gain_se"],
    }
    _write_summary(run_dir, summary)
    return summary


def _greedy_correct(cfg: TrainConfig, policy, tokenizer, task, rows: list[dict], scorer) -> list[bool]:
    """Whether each held-out problem's greedy answer is right, as the RL arm's evaluation decodes it."""
    from tinyrl.prompts import encode_prompts
    from tinyrl.rollout import SamplingConfig, make_engine

    prompts = encode_prompts(task, rows, tokenizer, cfg.model.template, cfg.rollout.max_prompt_tokens, "evaluation")
    engine = make_engine("hf", policy, tokenizer, batch_size=cfg.rollout.batch_size)
    greedy = SamplingConfig(max_new_tokens=cfg.rollout.max_response_tokens, temperature=0.0,
                            stop=tuple(getattr(task, "stop", ())))
    completions = engine.generate(prompts, greedy)
    return [r.correct for r in scorer.score([c.text for c in completions], list(rows))]


def _standard_error(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (reward workers) so far."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _write_summary(run_dir: Path, summary: dict) -> None:
    staging = run_dir / "summary.json.tmp"
    staging.write_text(json.dumps(summary, indent=2))
    os.replace(staging, run_dir / "summary.json")


def _already_finished(cfg: TrainConfig, run: Run) -> dict:
    summary_path = run.dir / "summary.json"
    message = f"run in {run.dir} already finished {run.state['step']} of {cfg.trainer.steps} steps; nothing to resume"
    log.warning(message)
    print(message)
    return json.loads(summary_path.read_text()) if summary_path.exists() else {"message": message}
