"""Asynchronous rollouts (`trainer.max_staleness`): seconds per RL step with k=1 against k=0, and held-out accuracy.

`speed`: the default run's RL phase (tiny Qwen2 distilled by the default's own distillation, 64 Countdown prompts x
8 completions of up to 96 tokens, GRPO) from one start model, in one process: the synchronous loop (k=0, the
transformers engine in the training process) against k=1 (the same engine in a process of its own, sampling the
next batch while the trainer updates; token-level TIS). Each side has one torch thread (the trainer, and the engine
process), arms alternate in rounds so that a drift in the machine's speed falls on both. Reported: median seconds
per step over steps 2..N of every round, the sync step's phases, and what k=1 waited for.

`learning`: the default run (`tinyrl-train seed=S threads=1`, distillation then 50 GRPO steps; with `--model`, RL
only, from that model) against the same with `trainer.max_staleness=1 rollout.layout=server
algorithm.rollout_correction.rollout_is=token`, each seed; held-out greedy accuracy on all 1,278 test problems
after RL, and its standard error. The schedule of which policy samples
which batch does not depend on timing, so these figures do not depend on the machine's load.

Usage:
    .venv/bin/python benchmarks/bench_async.py speed [--steps 6] [--rounds 2] [--model DIR] [--out DIR]
    .venv/bin/python benchmarks/bench_async.py learning [--seeds 0 1 2] [--parallel] [--model DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASYNC = ["trainer.max_staleness=1", "rollout.layout=server", "algorithm.rollout_correction.rollout_is=token"]


def start_model(out: Path) -> Path:
    """The default run's distilled model (its distillation only, a small evaluation), made once under `out`."""
    model = out / "start" / "sft_model"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "tinyrl.train", f"run_dir={out / 'start'}", "trainer.steps=0",
                        "task.eval_size=8", "threads=1", "logging.progress=false"], check=True)
    return model


def run_arm(model: Path, run_dir: Path, steps: int, extra: list[str]) -> dict:
    import torch

    from tinyrl.compose import load_config
    from tinyrl.trainer import RLTrainer

    torch.set_num_threads(1)  # the trainer's thread; the engine process takes the same count
    cfg = load_config([f"model.path={model}", f"run_dir={run_dir}", "sft.enabled=false", "task.eval_size=8",
                       f"trainer.steps={steps}", "trainer.eval_every=0", "trainer.samples_every=0", "threads=1",
                       "logging.progress=false", "logging.plot=false", *extra])
    trainer = RLTrainer.from_config(cfg)
    seconds, rows = [], []
    try:
        for _ in range(steps):
            started = time.perf_counter()
            rows.append(trainer.step())
            seconds.append(time.perf_counter() - started)
    finally:
        trainer.close()
    later = rows[1:]
    phases = sorted({k for r in later for k in r if k.startswith("time/")})
    return {"seconds": seconds[1:], "phases": {p: statistics.mean(r.get(p, 0.0) for r in later) for p in phases},
            "length": statistics.mean(r["response/length_mean"] for r in later)}


def speed(args) -> None:
    model = args.model or start_model(args.out)
    arms = {"k=0 (synchronous)": [], "k=1 (engine in its own process)": ASYNC}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for round_ in range(args.rounds):
        for name, extra in arms.items():
            run_dir = args.out / f"speed_{round_}_{'async' if extra else 'sync'}_{time.time_ns()}"
            results[name].append(run_arm(model, run_dir, args.steps, extra))
            print(f"round {round_} {name}: {[round(s, 2) for s in results[name][-1]['seconds']]}", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} with {os.cpu_count()} "
          f"cores, load average before: {args.load}; after: {os.getloadavg()[0]:.1f}")
    medians = {}
    for name, runs in results.items():
        seconds = [s for r in runs for s in r["seconds"]]
        medians[name] = statistics.median(seconds)
        phases = {p: statistics.mean(r["phases"][p] for r in runs if p in r["phases"]) for p in runs[0]["phases"]}
        shown = ", ".join(f"{p.removeprefix('time/')} {v:.2f}" for p, v in phases.items()
                          if p in ("time/generate", "time/score", "time/update", "time/sync", "time/old_logprobs",
                                   "time/wait_for_engine", "time/engine_idle", "time/assemble"))
        print(f"| {name} | {medians[name]:.2f} | {min(seconds):.2f}-{max(seconds):.2f} | {len(seconds)} | "
              f"{statistics.mean(r['length'] for r in runs):.1f} | {shown} |")
    sync, one = medians.values()
    print(f"\nspeed-up of k=1 over k=0 (median seconds per step): {sync / one:.2f}x")


def learning(args) -> None:
    procs = []
    for seed in args.seeds:
        for arm, extra in (("sync", []), ("async", ASYNC)):
            run_dir = args.out / f"{arm}_seed{seed}"
            if (run_dir / "summary.json").exists():
                continue
            start = [f"model.path={args.model}", "sft.enabled=false"] if args.model else []
            command = [sys.executable, "-m", "tinyrl.train", f"seed={seed}", "threads=1", f"run_dir={run_dir}",
                       "logging.progress=false", *start, *extra]
            log = open(args.out / f"{arm}_seed{seed}.log", "w")
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            if not args.parallel:
                procs[-1].wait()
    for proc in procs:
        proc.wait()
    print("| seed | after distillation | after RL, k=0 | after RL, k=1 | k=1 - k=0 (points, ± s.e.) | "
          "wall s, k=0 | wall s, k=1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed in args.seeds:
        s = {arm: json.loads((args.out / f"{arm}_seed{seed}" / "summary.json").read_text()) for arm in ("sync", "async")}
        a, b, n = s["sync"]["accuracy_after_rl"], s["async"]["accuracy_after_rl"], s["sync"]["eval_problems"]
        se = math.sqrt(a * (1 - a) / n + b * (1 - b) / n)  # two independent estimates (an upper bound if paired)
        rl = {arm: s[arm]["wall_seconds"] for arm in s}
        print(f"| {seed} | {s['sync']['accuracy_before_rl']:.3f} / {s['async']['accuracy_before_rl']:.3f} | {a:.3f} | "
              f"{b:.3f} | {100 * (b - a):+.1f} ± {100 * se:.1f} | {rl['sync']:.0f} | {rl['async']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", type=Path, default=None, help="start model (default: the default run's distillation)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_async"))
    p = sub.add_parser("learning")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", action="store_true", help="run every arm at once (accuracy does not depend on it)")
    p.add_argument("--model", type=Path, default=None,
                   help="start RL from this model, no distillation (default: each run distils, as tinyrl-train does)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_async"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.load = f"{os.getloadavg()[0]:.1f}"
    speed(args) if args.what == "speed" else learning(args)


if __name__ == "__main__":
    main()
