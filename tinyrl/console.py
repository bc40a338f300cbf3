"""What a run prints for a person: a line when each long phase starts and ends, a progress line while steps run
(`Progress`), every held-out accuracy, and a closing summary at the end pointing to the files worth opening.

Figures measured on the training samples of a step are labelled `train`; figures on the held-out problems are
labelled `held-out`. Everything goes to stdout and `logging.progress=false` silences it (the files are the record).
"""

from __future__ import annotations

import numbers
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_figure(value: Any) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.4g}"


class Progress:
    """One console line per update with step, rate, ETA and key figures.

    `label` names what is counted ("RL step", "distillation step"). On a TTY the line is redrawn in place (at
    most every `min_interval_s`, default 0.2 s); otherwise (log files, CI) a plain line is printed at most every
    `min_interval_s` (default 30 s). The first update and the last step are always shown. ETA is measured from
    the steps done by this process, so a resumed run (`start_step` > 0) gets an honest estimate. `enabled=False`
    makes every call a no-op (quiet runs); `note` prints a line of its own between updates.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        stream: IO[str] | None = None,
        min_interval_s: float | None = None,
        width: int = 20,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
        label: str = "step",
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"Progress: total_steps must be an int >= 1, got {total_steps!r}")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"Progress: start_step must be in [0, {total_steps}], got {start_step!r}")
        self.total_steps = total_steps
        self.start_step = start_step
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = min_interval_s if min_interval_s is not None else (0.2 if self.tty else 30.0)
        self.width = width
        self.enabled = enabled
        self.label = label
        self._clock = clock
        self._t0 = clock()
        self._last_shown: float | None = None
        self._last_len = 0

    def format(self, step: int, figures: Mapping[str, Any] | None = None) -> str:
        """The progress line for `step` steps done (no ANSI codes, no line ending)."""
        done = min(max(step, 0), self.total_steps)
        frac = done / self.total_steps
        filled = int(round(frac * self.width))
        parts = [f"{self.label} {step}/{self.total_steps} [{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%}"]
        steps_here = step - self.start_step
        if steps_here > 0:
            per_step = (self._clock() - self._t0) / steps_here
            parts.append(f"{per_step:.3g} s/step")
            parts.append(f"ETA {format_duration(per_step * max(self.total_steps - step, 0))}")
        for key, value in (figures or {}).items():
            parts.append(f"{key} {_format_figure(value)}")
        return " | ".join(parts)

    def update(self, step: int, figures: Mapping[str, Any] | None = None) -> bool:
        """Show progress after `step` steps; returns True when a line was written (rate-limited)."""
        if not self.enabled:
            return False
        now = self._clock()
        final = step >= self.total_steps
        if self._last_shown is not None and not final and now - self._last_shown < self.min_interval_s:
            return False
        self._last_shown = now
        line = self.format(step, figures)
        if self.tty:
            pad = " " * max(self._last_len - len(line), 0)
            self.stream.write("\r" + line + pad + ("\n" if final else ""))
            self._last_len = 0 if final else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return True

    def note(self, text: str) -> None:
        """A line of its own between progress lines (e.g. a held-out accuracy): never rate-limited, and on a
        terminal it replaces the progress line, which the next update redraws below it."""
        if not self.enabled:
            return
        if self.tty:
            text = "\r" + text + " " * max(self._last_len - len(text), 0)
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End a TTY line left open by an interrupted run."""
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0


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
