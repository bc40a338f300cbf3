"""What a reward worker adds per sample: Countdown completions scored through RewardScorer, with and without limits.

    .venv/bin/python benchmarks/bench_reward_workers.py                 # prints one markdown row per setting
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/bench_reward_workers.py   # the same on other code

The mix is bench_countdown's (a third correct, a third wrong, a third garbage; about 600 characters each). Each
setting scores it in batches of 512 with 2 workers, once to warm up and then `--passes` times; the median pass is
reported. "trainer limits" are the config defaults a run uses (5 s wall clock, 10 CPU seconds, 4096 MB); "no
limits" is RewardScorer's own default (wall clock only). The in-process verifier time is printed for scale.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_countdown import completion_mix  # noqa: E402

from tinyrl.reward_workers import RewardScorer  # noqa: E402
from tinyrl.tasks.countdown import Countdown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--completions", type=int, default=8192)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()

    task = Countdown()
    rows = task.dataset("train", args.completions, seed=0)
    completions, _ = completion_mix(task, rows, random.Random(1))
    start = time.perf_counter()
    for c, r in zip(completions, rows):
        task.reward(c, r)
    in_process = time.perf_counter() - start
    print(f"| verifier in-process, one core | {len(rows) / in_process:,.0f} completions/s "
          f"({in_process / len(rows) * 1e6:.1f} us each) |")
    import tinyrl

    for name, limits in (("no limits", {}), ("trainer limits", {"cpu_s": 10.0, "memory_mb": 4096})):
        with RewardScorer(task, workers=2, timeout=5.0, **limits) as scorer:
            passes = []
            for i in range(args.passes + 1):
                start = time.perf_counter()
                for j in range(0, len(completions), 512):
                    scorer.score(completions[j : j + 512], rows[j : j + 512])
                if i:  # the first pass warms up
                    passes.append(time.perf_counter() - start)
        seconds = statistics.median(passes)
        print(f"| RewardScorer, 2 workers, {name} ({os.path.dirname(tinyrl.__file__)}) | "
              f"{len(completions) / seconds:,.0f} completions/s ({seconds / len(completions) * 1e6:.1f} us each; "
              f"passes {min(passes):.2f}-{max(passes):.2f} s) |")
    print(f"| 1-min load average at the end | {os.getloadavg()[0]:.1f} |")


if __name__ == "__main__":
    main()
