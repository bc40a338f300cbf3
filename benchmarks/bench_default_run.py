"""Run the README's main command (`tinyrl-train`, the embedded CPU default) for several seeds and tabulate
held-out accuracy before and after RL, wall time, and seconds per RL phase.

Usage: .venv/bin/python benchmarks/bench_default_run.py [--seeds 0 1 2] [--out runs/bench_default] [overrides...]
Prints a markdown table to paste into benchmarks/RESULTS.md and the README.
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
    steps = [r for r in rows if "reward/mean" in r]
    phases = sorted({k for r in steps for k in r if k.startswith("time/")})
    summary["phase_seconds"] = {p[5:]: sum(r.get(p) or 0.0 for r in steps) / len(steps) for p in phases}
    summary["train_accuracy_first_last"] = (
        sum(r["reward/accuracy"] for r in steps[:10]) / min(10, len(steps)),
        sum(r["reward/accuracy"] for r in steps[-10:]) / min(10, len(steps)),
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_default"))
    args, overrides = parser.parse_known_args()
    results = {seed: run_seed(seed, args.out, overrides) for seed in args.seeds}
    print(f"\nCommand: `tinyrl-train seed=S {' '.join(overrides)}` for S in {args.seeds}; "
          f"{platform.machine()} with {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}\n")
    print("| seed | accuracy after distillation | accuracy after RL | gain (points) | RL steps | wall seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, s in results.items():
        gain = 100 * (s["accuracy_after_rl"] - s["accuracy_before_rl"])
        print(f"| {seed} | {s['accuracy_before_rl']:.3f} | {s['accuracy_after_rl']:.3f} | {gain:+.1f} | "
              f"{s['rl_steps']} | {s['process_seconds']:.0f} |")
    print("\nSeconds per RL step by phase (mean over steps):\n")
    phases = sorted({p for s in results.values() for p in s["phase_seconds"]})
    print("| seed | " + " | ".join(phases) + " |")
    print("| --- |" + " --- |" * len(phases))
    for seed, s in results.items():
        print(f"| {seed} | " + " | ".join(f"{s['phase_seconds'].get(p, 0.0):.2f}" for p in phases) + " |")
    print("\nTraining-sample accuracy, mean of the first and last 10 RL steps:",
          {seed: tuple(round(x, 3) for x in s["train_accuracy_first_last"]) for seed, s in results.items()})


if __name__ == "__main__":
    main()
