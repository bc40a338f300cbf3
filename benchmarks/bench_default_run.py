"""Run the README's main command (`tinyrl-train`, the embedded CPU default) for several seeds with the
distillation-only baseline arms switched on, and print the README's table: per seed, the distilled start, the best
distillation-only arm given the RL phase's seconds, the accuracy after RL, the gains, and wall seconds.

Each seed runs `tinyrl-train seed=S run_dir=OUT/seedS baseline.enabled=true OVERRIDES`, one seed after another
(never at once: two runs on two cores slow each other several-fold). `wall_seconds` is the RL arm's own time (the
quickstart's: the baseline arms run after it); `cpu_seconds` is its user+system CPU time.

Usage: .venv/bin/python benchmarks/bench_default_run.py [--seeds 0 1 2] [--out runs/bench_default] [--no-baseline]
       [overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict:
    run_dir = out / f"seed{seed}"
    command = [str(Path(sys.executable).parent / "tinyrl-train"), f"seed={seed}", f"run_dir={run_dir}", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["process_seconds"] = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = list({r["step"]: r for r in rows if "reward/mean" in r}.values())
    phases = sorted({k for r in steps for k in r if k.startswith("time/") and k != "time/evaluate"})
    summary["phase_seconds"] = {p[5:]: sum(r.get(p) or 0.0 for r in steps) / len(steps) for p in phases}
    evals = [r for r in rows if "eval/accuracy" in r]
    summary["eval_curve"] = list({r["step"]: r["eval/accuracy"] for r in evals}.values())
    summary["examples"] = before_after_examples(run_dir)
    summary["train_accuracy_first_last"] = (
        sum(r["reward/accuracy"] for r in steps[:10]) / min(10, len(steps)),
        sum(r["reward/accuracy"] for r in steps[-10:]) / min(10, len(steps)),
    )
    return summary


def before_after_examples(run_dir: Path, count: int = 2) -> list[dict]:
    """Held-out problems whose greedy completion was wrong before RL and right after it: the evaluation files of
    the first and last evaluation hold the completions of the same leading problems."""
    files = sorted((run_dir / "eval").glob("step_*.json"))
    if len(files) < 2:
        return []
    before, after = (json.loads(f.read_text())["samples"] for f in (files[0], files[-1]))
    changed = [{"prompt": b["prompt"], "before": b["completion"], "after": a["completion"]}
               for b, a in zip(before, after) if b["prompt"] == a["prompt"] and not b["correct"] and a["correct"]]
    return changed[:count]


def print_examples(seed: int, examples: list[dict]) -> None:
    for example in examples:
        print(f"\nSeed {seed}, held-out problem `{example['prompt'].splitlines()[0]}`\n")
        print("Before RL (wrong):\n```\n" + example["before"].strip() + "\n```\n")
        print("After RL (right):\n```\n" + example["after"].strip() + "\n```")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_default"))
    parser.add_argument("--no-baseline", action="store_true", help="the RL arm only (the quickstart as it is)")
    args, overrides = parser.parse_known_args()
    if not args.no_baseline:
        overrides = ["baseline.enabled=true", *overrides]
    results = {seed: run_seed(seed, args.out, overrides) for seed in args.seeds}
    print(f"\nCommand: `tinyrl-train seed=S run_dir=DIR {' '.join(overrides)}` for S in {args.seeds}; "
          f"{platform.machine()} with {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}\n")
    any_s = next(iter(results.values()))
    print(f"Greedy accuracy on {any_s['eval_problems']} held-out {any_s['eval_split']} problems.\n")
    print("| seed | distilled start | best distillation-only baseline | after RL | RL - start (points) | "
          "RL - baseline (points, ± s.e.) | wall seconds | CPU seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed, s in results.items():
        start, after = s["accuracy_before_rl"], s["accuracy_after_rl"]
        b = s.get("baseline")
        base = f"{b['best_accuracy']:.3f} ({b['best']})" if b else "-"
        over = f"{100 * b['rl_gain_over_best']:+.1f} ± {100 * b['rl_gain_over_best_se']:.1f}" if b else "-"
        print(f"| {seed} | {start:.3f} | {base} | {after:.3f} | {100 * (after - start):+.1f} | {over} | "
              f"{s['wall_seconds']:.0f} | {s.get('cpu_seconds', float('nan')):.0f} |")
    if not args.no_baseline:
        print("\nEvery distillation-only arm (distillation steps; accuracy):\n")
        names = [a["name"] for a in any_s["baseline"]["arms"]]
        print("| seed | RL phase seconds | " + " | ".join(names) + " |")
        print("| --- | --- |" + " --- |" * len(names))
        for seed, s in results.items():
            b = s["baseline"]
            print(f"| {seed} | {b['rl_seconds']:.0f} | "
                  + " | ".join(f"{a['steps']} steps; {a['accuracy']:.3f}" for a in b["arms"]) + " |")
    print("\nSeconds per RL step by phase (mean over steps), distillation seconds, eval curve:\n")
    phases = sorted({p for s in results.values() for p in s["phase_seconds"]})
    print("| seed | " + " | ".join(phases) + " | distillation s | eval curve |")
    print("| --- |" + " --- |" * (len(phases) + 2))
    for seed, s in results.items():
        print(f"| {seed} | " + " | ".join(f"{s['phase_seconds'].get(p, 0.0):.2f}" for p in phases)
              + f" | {s.get('sft_seconds', 0.0):.0f} | {', '.join(f'{a:.3f}' for a in s['eval_curve'])} |")
    print("\nTraining-sample accuracy, mean of the first and last 10 RL steps:",
          {seed: tuple(round(x, 3) for x in s["train_accuracy_first_last"]) for seed, s in results.items()})
    print("\nGreedy completions of held-out problems that RL turned from wrong to right:")
    for seed, s in results.items():
        print_examples(seed, s["examples"])


if __name__ == "__main__":
    main()
