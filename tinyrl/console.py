"""What a run prints for a person: a line when each long phase starts and ends, every held-out accuracy, and a
closing summary at the end pointing to the files worth opening.

Figures measured on the training samples of a step are labelled `train`; figures on the held-out problems are
labelled `held-out`. Everything goes to stdout and `logging.progress=false` silences it (the files are the record).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tinyrl.metrics import format_duration


class Console:
    """Phase lines and held-out results of one run."""

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.stream = stream

    def say(self, text: str) -> None:
        if self.enabled:
            stream = self.stream or sys.stdout
            stream.write(text + "\n")
            stream.flush()

    @contextmanager
    def phase(self, doing: str) -> Iterator[Callable[[str], None]]:
        """`doing ...` when a long phase starts; `doing: done (3.2 s)` when it ends, or the text passed to the
        yielded function instead of `doing: done`."""
        self.say(f"{doing} ...")
        started, ending = time.perf_counter(), [f"{doing}: done"]
        yield lambda text: ending.__setitem__(0, text)
        self.say(f"{ending[0]} ({_seconds(time.perf_counter() - started)})")


def _seconds(elapsed: float) -> str:
    return f"{elapsed:.1f} s" if elapsed < 60 else format_duration(elapsed)


def held_out_line(when: str, result: Mapping[str, Any]) -> str:
    """`held-out accuracy before RL: 0.256 on 500 problems (greedy; pass@8 0.610)`; the mean reward instead when
    the rewards do not say whether an answer is right (accuracy not reported)."""
    passes = sorted(result.get("pass@k", {}).items(), key=lambda kv: int(kv[0]))
    extra = "".join(f"; pass@{k} {v:.3f}" for k, v in passes)
    if result.get("accuracy") is None:
        return (f"held-out mean reward {when}: {_figure(result.get('mean_reward'))} on {result['n_problems']} "
                f"problems (greedy; accuracy not reported: {NO_ACCURACY})")
    return f"held-out accuracy {when}: {result['accuracy']:.3f} on {result['n_problems']} problems (greedy{extra})"


NO_ACCURACY = "no reward that ran says whether an answer is right"


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The closing lines: held-out accuracy before and after RL, the best distillation-only baseline arm when
    `baseline.enabled` ran them, and where the curves and samples are."""
    run = Path(summary["run_dir"])
    n, split, steps = summary["eval_problems"], summary.get("eval_split", "test"), summary["rl_steps"]
    took = format_duration(summary.get("wall_seconds", 0.0))
    before, after = summary["accuracy_before_rl"], summary["accuracy_after_rl"]
    if after is None:  # the rewards do not judge correctness: the mean reward is what there is to show
        before = summary.get("eval_before_rl", {}).get("mean_reward")
        after = summary.get("eval_after_rl", {}).get("mean_reward")
        first = (f"held-out mean reward {_figure(before)} -> {_figure(after)} on {n} {split} problems after {steps} "
                 f"RL steps (accuracy not reported: {NO_ACCURACY}); {took} in all")
    elif steps:
        first = (
            f"held-out accuracy {before:.3f} -> {after:.3f} ({100 * (after - before):+.1f} points) on {n} {split} "
            f"problems after {steps} RL steps; {took} in all"
        )
    else:
        first = f"held-out accuracy {after:.3f} on {n} {split} problems (no RL steps); {took} in all"
    files = [str(run / name) for name in ("curves.png", "samples.md") if (run / name).exists()]
    second = f"see {' and '.join(files)}; every figure is in {run / 'summary.json'}" if files else (
        f"every figure is in {run / 'summary.json'}"
    )
    lines = [first]
    failures = summary.get("reward_errors") or {}
    if failures.get("failed") or failures.get("printed"):
        parts = []
        if failures.get("failed"):
            timeouts = f", {failures['timeouts']} of them timeouts" if failures.get("timeouts") else ""
            parts.append(f"{failures['failed']} rewards failed and scored 0{timeouts}")
        if failures.get("printed"):
            parts.append(f"reward code printed {failures['printed']} lines that look like errors")
        lines.append(f"{' and '.join(parts)} during this run; every one is in {failures['file']}")
    baseline = summary.get("baseline")
    if baseline:
        lines.append(
            f"best distillation-only baseline in the RL phase's time ({baseline['best']}): held-out accuracy "
            f"{baseline['best_accuracy']:.3f}; RL is {100 * baseline['rl_gain_over_best']:+.1f} "
            f"± {100 * baseline['rl_gain_over_best_se']:.1f} points over it (paired standard error)"
        )
    return lines + [second]
