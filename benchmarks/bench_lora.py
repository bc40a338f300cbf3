"""LoRA against full training on the default task, from the same distilled start, same number of RL steps.

1. distil once: the default experiment with `trainer.steps=0` (`OUT/distil`: its `sft_model/` is every arm's start);
2. each arm runs the default experiment's RL phase on it (`model.path=OUT/distil/sft_model sft.enabled=false`):
   full training at the default lr, and LoRA (all-linear, alpha = 2 x rank, so alpha/r is the same for every rank)
   at rank 8 and rank 1 with the learning rate scaled by `--lora-lr-scale` (10x: "LoRA Without Regret",
   Thinking Machines, 2025);
3. print held-out greedy accuracy (all 1,278 test problems) before and after RL, its difference to full training
   with a standard error, and seconds per RL step (the step's phases, evaluation excluded).

Arms run one after another (two runs on two cores slow each other several-fold).

Usage: .venv/bin/python benchmarks/bench_lora.py [--out runs/bench_lora] [--seed 0] [--lora-lr-scale 10] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def tinyrl_train(run_dir: Path, overrides: list[str]) -> float:
    started = time.perf_counter()
    command = [str(Path(sys.executable).parent / "tinyrl-train"), f"run_dir={run_dir}", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def arm_figures(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = list({r["step"]: r for r in rows if "reward/mean" in r}.values())
    phases = sorted({k for r in steps for k in r if k.startswith("time/") and k != "time/evaluate"})
    per_step = {p[5:]: sum(r.get(p) or 0.0 for r in steps) / len(steps) for p in phases}
    return {"before": summary["accuracy_before_rl"], "after": summary["accuracy_after_rl"],
            "seconds_per_step": sum(per_step.values()), "phases": per_step, "steps": len(steps)}


def difference(a: float, b: float, n: int) -> tuple[float, float]:
    """a - b in points and its standard error, two accuracies on the same n problems taken as independent (the
    eval files keep only 16 completions, so the paired error, which is smaller, cannot be computed from them)."""
    return 100 * (a - b), 100 * math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_lora"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-lr-scale", type=float, default=10.0)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 1])
    args, overrides = parser.parse_known_args()
    from tinyrl.compose import load_config

    cfg = load_config(overrides)
    full_lr, steps, problems = cfg.trainer.lr, cfg.trainer.steps, cfg.task.eval_size
    common = [f"seed={args.seed}", *overrides]
    distil = args.out / "distil"
    if not (distil / "summary.json").exists():
        tinyrl_train(distil, [*common, "trainer.steps=0"])
    start = [*common, f"model.path={distil / 'sft_model'}", "sft.enabled=false"]
    arms: dict[str, list[str]] = {"full": []}
    for rank in args.ranks:
        arms[f"LoRA r={rank}"] = ["model.lora.enabled=true", f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}",
                                  f"trainer.lr={full_lr * args.lora_lr_scale:g}"]
    figures, wall = {}, {}
    for name, extra in arms.items():
        run_dir = args.out / name.replace(" ", "_").replace("=", "")
        if not (run_dir / "summary.json").exists():
            wall[name] = tinyrl_train(run_dir, [*start, *extra])
        figures[name] = arm_figures(run_dir)
        figures[name]["lr"] = full_lr if name == "full" else full_lr * args.lora_lr_scale

    print(f"# {platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"seed {args.seed}, {steps} RL steps from {distil / 'sft_model'}")
    print("| arm | lr | held-out before RL | after RL | minus full (points, ± s.e.) | s per RL step "
          "(generate, update) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, f in figures.items():
        gap = "-" if name == "full" else "%+.1f ± %.1f" % difference(f["after"], figures["full"]["after"], problems)
        print(f"| {name} | {f['lr']:g} | {f['before']:.3f} | {f['after']:.3f} | {gap} | {f['seconds_per_step']:.2f} "
              f"({f['phases'].get('generate', 0):.2f}, {f['phases'].get('update', 0):.2f}) |")
    print(json.dumps({"figures": figures, "process_seconds": wall}, indent=1))


if __name__ == "__main__":
    main()
