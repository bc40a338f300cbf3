"""One process against two torchrun ranks (FSDP2 on gloo) on the same RL steps: seconds per phase, and equality.

    .venv/bin/python benchmarks/bench_distributed.py            # prints a markdown table
    .venv/bin/python benchmarks/bench_distributed.py --steps 3  # a shorter run

All runs train the same config (the tiny Countdown model built in the run directory, no distillation, GRPO
with a reference): one process with 1 thread, one process with 2 threads, and 2 ranks with 1 thread each.
Reported per phase: the median over RL steps of the slowest rank's seconds; then the total wall time of each
command (start-up included) and the largest difference between the 1-process and 2-rank runs' metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def overrides(run_dir: Path, steps: int, threads: int) -> list[str]:
    return [
        f"run_dir={run_dir}", "model.path=null", "sft.enabled=false", "task.train_size=2000", "task.eval_size=32",
        "task.reward_workers=0", "algorithm=grpo", "algorithm.kl_coef=0.001", f"trainer.steps={steps}",
        "trainer.prompts_per_step=32", "trainer.prompts_per_mini_batch=32", "rollout.n=8",
        "rollout.max_response_tokens=48", "trainer.eval_every=0", "trainer.samples_every=0", "trainer.save_every=0",
        "logging.progress=false", "logging.plot=false", f"threads={threads}",
    ]


def run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return time.perf_counter() - started


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    single, double, two = root / "one-1t", root / "one-2t", root / "two"
    walls = [
        run([sys.executable, "-m", "tinyrl.train", *overrides(single, args.steps, 1)]),
        run([sys.executable, "-m", "tinyrl.train", *overrides(double, args.steps, 2)]),
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "tinyrl.train", *overrides(two, args.steps, 1)]),
    ]
    steps = [[r for r in rows(d) if "time/generate" in r] for d in (single, double, two)]
    phases = [k for k in steps[0][0] if k.startswith("time/")]
    print(f"{args.steps} GRPO steps of 32 prompts x 8 completions (tiny model), median seconds per step\n")
    print("| phase | 1 process, 1 thread | 1 process, 2 threads | 2 ranks, 1 thread each |")
    print("| --- | ---: | ---: | ---: |")
    for key in phases:
        cells = " | ".join(f"{statistics.median(r.get(key, 0.0) for r in run_steps):.3f}" for run_steps in steps)
        print(f"| {key[5:]} | {cells} |")
    print(f"| whole command (start-up, evaluation, checkpoint) | {' | '.join(f'{w:.1f}' for w in walls)} |")
    one = single
    worst = max(
        (abs(a[k] - b[k]), k)
        for a, b in zip(rows(one), rows(two)) for k in a
        if not k.startswith("time/") and isinstance(a[k], float) and isinstance(b.get(k), float)
    )
    print(f"\nlargest difference between the runs' metrics: {worst[0]:.2e} ({worst[1]})")


if __name__ == "__main__":
    main()
