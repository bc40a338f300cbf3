"""Distillation-only baseline arms (`baseline.enabled`): does RL beat distilling longer in the same time?

After the RL arm, each arm of `baseline.arms` distils the same training problems with its own teacher for as many
steps as the RL phase's seconds buy, and is measured greedily on the same held-out problems; `summary.json` gets
each arm's accuracy and its paired gap to RL (`baseline`). The arms run in one process (`validate` refuses them
under a torchrun world of more than one).
"""

from __future__ import annotations

import json
from pathlib import Path

from tinyrl.checkpoint import latest_checkpoint
from tinyrl.config import TrainConfig
from tinyrl.console import Console
from tinyrl.devices import resolve_attn_implementation
from tinyrl.distributed import World
from tinyrl.evaluate import sample_eval
from tinyrl.metrics import read_metrics
from tinyrl.prompts import encode_prompts
from tinyrl.reward_workers import scorer_from_config
from tinyrl.rollout import make_engine
from tinyrl.rundir import SUMMARY_FILE, write_json
from tinyrl.sft import distil
from tinyrl.task import get_task


def rl_phase_seconds(run_dir: Path) -> float:
    """Seconds the RL steps took, from `metrics.jsonl`: every phase of every step except evaluation (the last row
    of each step counts, should a step have been written twice)."""
    steps = {row["step"]: row for row in read_metrics(run_dir) if "reward/mean" in row}
    return sum(v or 0.0 for row in steps.values() for k, v in row.items() if k.startswith("time/") and k != "time/evaluate")


def distillation_baselines(
    cfg: TrainConfig, run_dir: Path, base_path: str, task, train_rows: list[dict], eval_rows: list[dict], summary: dict,
    world: World, console: Console,
) -> dict:
    """Distillation-only arms in the RL arm's time, greedy-evaluated on the same held-out problems.

    Each arm of `baseline.arms` distils with its own teacher (`task.kwargs` updated by the arm's `task_kwargs`) on
    the same training problems: from `sft_model/` for as many distillation steps as the RL phase's seconds buy at
    the measured seconds per distillation step (`start: distilled`), or from the base model for the distillation
    steps plus those (`start: base`). The RL arm's final policy is answered again on the same problems, so each
    arm's gap to it comes with the standard error of a paired difference: se = std(d_i) / sqrt(n), d_i = c_rl,i -
    c_arm,i for per-problem correctness c. Results go into `summary.json` under `baseline`; models under `baselines/`.
    A killed run resumed with `resume=true` keeps the arms it finished (`baselines/armN.json`) and continues the
    arm it was in from that arm's last distillation checkpoint.
    """
    from tinyrl.models import load_policy

    attention = resolve_attn_implementation(cfg.model.attn_implementation, world.device)
    rl_seconds = rl_phase_seconds(run_dir)
    per_step = summary["sft_seconds"] / max(1, summary["sft_steps"])
    extra_steps = max(1, round(rl_seconds / per_step))
    (run_dir / "baselines").mkdir(exist_ok=True)
    console.say(f"distillation-only baselines: {len(cfg.baseline.arms)} arm(s); the RL phase's {rl_seconds:.1f} s buy "
                f"{extra_steps} distillation steps at {per_step:.2f} s each")
    arms = []
    with scorer_from_config(task, cfg.task) as scorer:
        final, final_tokenizer = load_policy(latest_checkpoint(run_dir) / "actor", device=world.device,
                                             attn_implementation=attention)
        rl_correct = _greedy_correct(cfg, final, final_tokenizer, task, eval_rows, scorer)
        del final
        for i, arm in enumerate(cfg.baseline.arms):
            steps = extra_steps if arm.start == "distilled" else summary["sft_steps"] + extra_steps
            record = {"name": arm.name, "task_kwargs": dict(arm.task_kwargs), "start": arm.start, "steps": steps}
            name, done_file = f"baselines/arm{i}", run_dir / "baselines" / f"arm{i}.json"
            if done_file.exists() and _same_arm(json.loads(done_file.read_text()), record):
                arms.append(json.loads(done_file.read_text()))
                continue
            teacher = get_task(cfg.task.name, **{**cfg.task.kwargs, **arm.task_kwargs})
            checkpoint = latest_checkpoint(run_dir / f"{name}_sft")
            start = checkpoint / "actor" if checkpoint is not None else (
                run_dir / "sft_model" if arm.start == "distilled" else Path(base_path))
            console.say(f"baseline arm {arm.name!r}: distillation from {start}")
            policy, tokenizer = load_policy(start, device=world.device, attn_implementation=attention)
            trained = distil(cfg, run_dir, policy, tokenizer, teacher, train_rows, world.device, checkpoint, console,
                             steps=steps, out_name=name, log_name=f"{name}_sft")
            correct = _greedy_correct(cfg, policy, tokenizer, task, eval_rows, scorer)
            del policy
            diffs = [float(a) - float(b) for a, b in zip(rl_correct, correct)]
            record.update(sft_seconds=trained["sft_seconds"], accuracy=sum(correct) / len(correct),
                          rl_gain=sum(diffs) / len(diffs), rl_gain_se=_standard_error(diffs))
            write_json(done_file, record)
            arms.append(record)
            console.say(f"baseline arm {arm.name!r}: held-out accuracy {record['accuracy']:.3f} after {steps} "
                        f"distillation steps")
    best = max(arms, key=lambda a: a["accuracy"])
    summary["baseline"] = {
        "rl_seconds": rl_seconds, "sft_seconds_per_step": per_step, "extra_steps": extra_steps, "arms": arms,
        "rl_accuracy_rechecked": sum(rl_correct) / len(rl_correct), "best": best["name"],
        "best_accuracy": best["accuracy"], "rl_gain_over_best": best["rl_gain"], "rl_gain_over_best_se": best["rl_gain_se"],
    }
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _same_arm(done: dict, record: dict) -> bool:
    return all(done.get(key) == value for key, value in record.items())


def _greedy_correct(cfg: TrainConfig, policy, tokenizer, task, rows: list[dict], scorer) -> list[bool]:
    """Whether each held-out problem's greedy answer is right, decoded and scored as the RL arm's evaluation does."""
    prompts = encode_prompts(task, rows, tokenizer, cfg.model.template, cfg.rollout.max_prompt_tokens, "evaluation")
    engine = make_engine("hf", policy, tokenizer, batch_size=cfg.rollout.batch_size)
    samples = sample_eval(engine, scorer, task, rows, prompts, max_new_tokens=cfg.rollout.max_response_tokens,
                          seed=cfg.seed, timeout_s=cfg.rollout.timeout_s)
    return [bool(r.correct) for r in samples.rewards]


def _standard_error(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5
