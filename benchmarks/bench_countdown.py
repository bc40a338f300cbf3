"""What Countdown costs: generating problems, solving them exactly, and scoring completions.

    .venv/bin/python benchmarks/bench_countdown.py            # prints a markdown table
    .venv/bin/python benchmarks/bench_countdown.py --quick    # 10k problems, for a smoke run

Measured: generating 100k problems (default configuration: 3-4 numbers in 1..99, targets 1..99); solving every
one with the exact solver and scoring the solver's answer with the verifier; the verifier's throughput in this
process on one core over a realistic mix of correct, wrong and garbage completions; the same mix through a
RewardScorer with 2 worker processes (the path the trainer uses); and the solver on uniformly random problems,
many of them unsolvable (the worst case: a full search).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import time

from tinyrl.reward_workers import RewardScorer
from tinyrl.tasks.countdown import Countdown, solve

THINK_FILLER = (
    "First I look at the target and the sizes of the numbers. A product of the two largest is far too big, "
    "so I try sums and differences first and keep multiplication for a small factor. "
)


def completion_mix(task: Countdown, rows: list[dict], rng: random.Random) -> tuple[list[str], list[str]]:
    """One completion per row: a third correct, a third wrong answers, a third garbage; with their kinds."""
    completions, kinds = [], []
    for i, row in enumerate(rows):
        numbers, target = row["numbers"], row["target"]
        think = THINK_FILLER * rng.randint(1, 4)
        kind = ("correct", "wrong", "garbage")[i % 3]
        if kind == "correct":
            text = f"{think}{task.demonstration(row)}"
        elif kind == "wrong":
            shuffled = rng.sample(numbers, len(numbers))
            expression = rng.choice(
                [
                    "+".join(map(str, shuffled)),  # usually the wrong result
                    "*".join(map(str, shuffled[:-1])),  # a number left out
                    f"({shuffled[0]}+{shuffled[1]})*{target}",  # the target used as a number
                ]
            )
            text = f"{think}</think>\n<answer>{expression}</answer>"
            if task.reward(text, row).correct:  # a lucky sum: drop a number instead, which is always wrong
                text = f"{think}</think>\n<answer>{'+'.join(map(str, shuffled[:-1]))}</answer>"
        else:
            text = rng.choice(
                [
                    think * 3,  # ran out of tokens without answering
                    f"{think}</think>\n<answer>{target} = {numbers[0]} + ...",
                    f"{think}<answer>9**9**9</answer>",
                    f"{think}<answer>{'(' * 300}1{')' * 300}</answer>",
                    f"<answer>{'<answer>' * 50}{numbers[0]}.5*2</answer>",
                ]
            )
        completions.append(text)
        kinds.append(kind)
    return completions, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=100_000)
    parser.add_argument("--completions", type=int, default=30_000)
    parser.add_argument("--random-problems", type=int, default=5_000)
    parser.add_argument("--quick", action="store_true", help="10k problems, 6k completions, 1k random problems")
    args = parser.parse_args()
    if args.quick:
        args.problems, args.completions, args.random_problems = 10_000, 6_000, 1_000

    task = Countdown()
    load_start = os.getloadavg()[0]
    table: list[tuple[str, str]] = []

    start = time.perf_counter()
    rows = task.dataset("train", args.problems, seed=0)
    generate_s = time.perf_counter() - start
    table.append((f"generate {len(rows):,} problems (train split)", f"{generate_s:.2f} s ({len(rows) / generate_s:,.0f}/s)"))

    start = time.perf_counter()
    failures = 0
    for row in rows:
        expression = solve(row["numbers"], row["target"])
        if expression is None or not task.reward(f"<answer>{expression}</answer>", row).correct:
            failures += 1
    solve_s = time.perf_counter() - start
    table.append(
        (
            f"solve + verify all {len(rows):,} (failures: {failures})",
            f"{solve_s:.2f} s ({solve_s / len(rows) * 1e6:.0f} us/problem)",
        )
    )

    rng = random.Random(1)
    mix_rows = [rows[i % len(rows)] for i in range(args.completions)]
    completions, kinds = completion_mix(task, mix_rows, rng)
    mean_chars = sum(map(len, completions)) / len(completions)
    start = time.perf_counter()
    rewards = [task.reward(c, r) for c, r in zip(completions, mix_rows)]
    verify_s = time.perf_counter() - start
    assert all(r.correct == (k == "correct") for r, k in zip(rewards, kinds)), "the mix is mislabelled"
    table.append(
        (
            f"verifier, in-process, one core ({len(completions):,} completions, mean {mean_chars:.0f} chars)",
            f"{len(completions) / verify_s:,.0f} completions/s ({verify_s / len(completions) * 1e6:.1f} us each)",
        )
    )

    start = time.perf_counter()
    with RewardScorer(task, workers=2, timeout=2.0) as scorer:
        started_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(completions), 512):
            scorer.score(completions[i : i + 512], mix_rows[i : i + 512])
        pooled_s = time.perf_counter() - start
    table.append(("RewardScorer start-up, 2 spawned workers", f"{started_s:.2f} s"))
    table.append(
        (
            "RewardScorer, 2 workers, batches of 512 (same mix)",
            f"{len(completions) / pooled_s:,.0f} completions/s",
        )
    )

    rng = random.Random(2)
    random_problems = [
        ([rng.randint(1, 99) for _ in range(rng.randint(3, 4))], rng.randint(1, 99)) for _ in range(args.random_problems)
    ]
    start = time.perf_counter()
    solved = sum(solve(numbers, target) is not None for numbers, target in random_problems)
    random_s = time.perf_counter() - start
    table.append(
        (
            f"solve {len(random_problems):,} uniformly random problems ({solved / len(random_problems):.0%} solvable)",
            f"{random_s / len(random_problems) * 1e6:.0f} us/problem",
        )
    )

    table.append(("1-min load average at start / end (other processes share the cores)", f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"))
    table.append(("peak RSS of this process", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"))

    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in table:
        print(f"| {name} | {value} |")


if __name__ == "__main__":  # RewardScorer spawns workers, which re-import this file
    main()
