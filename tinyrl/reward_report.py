"""What a batch of rewards tells a person: failures shown and kept, and the score's named components averaged.

A reward that raises, times out or kills its worker scores 0 and training goes on (`tinyrl.reward_workers`);
`RewardErrorLog` makes sure a person sees why: the first failure of each kind is printed with its traceback and
row, and so is the first of each distinct line reward code printed that looks like an error (code that catches
its own errors and returns 0, as veRL's scorers do, says so only there); every one is kept in
``reward_errors.jsonl``, and `RewardErrorLog.check` stops a run whose reward code is plainly broken.
`reward_error_summary` counts that file for the run's closing lines and ``summary.json``. `component_metrics`
averages ``Reward.components`` into ``reward/<name>`` metrics; `completion_metrics` gives a step's reward and
length figures.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tinyrl.monitor import TrainingError
from tinyrl.task import Reward, reward_rates

__all__ = ["RewardErrorLog", "RewardsFailed", "error_of", "completion_metrics", "component_metrics",
           "reward_error_summary"]

log = logging.getLogger("tinyrl")

_SHOWN_CHARS = 400  # of a row or a completion on the console; the file keeps more
_KEPT_CHARS = 4000


class RewardsFailed(TrainingError):
    """Too many rewards of one step failed: the reward code is broken, training on zeros would waste the run."""


def error_of(reward: Reward) -> str | None:
    """The error message a failed reward carries, or None."""
    info = reward.info if isinstance(reward.info, dict) else {}
    error = info.get("error")
    return None if error is None else str(error)


def _kind(reward: Reward) -> str:
    """What makes two errors the same: the exception type and the line that raised it (messages carry data)."""
    error = error_of(reward) or ""
    where = reward.info.get("where", "")
    return f"{error.split(':', 1)[0]} at {where}" if where else error


def _printed_kind(line: str) -> str:
    """What makes two printed lines the same message: the text with numbers and addresses blanked out."""
    return "printed: " + re.sub(r"0x[0-9a-fA-F]+|\d+", "#", line)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def component_metrics(rewards: Sequence[Reward], reserved: Any = ()) -> dict[str, float]:
    """``reward/<name>``: the mean of each named component over the completions that report it.

    A name that would overwrite a metric in ``reserved`` (e.g. ``reward/mean``) is logged as
    ``reward/component_<name>``.
    """
    sums: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for reward in rewards:
        for name, value in (reward.components or {}).items():
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] += 1
    out = {}
    for name in sorted(sums):
        key = f"reward/{name}"
        if key in reserved:
            key = f"reward/component_{name}"
        out[key] = sums[name] / counts[name]
    return out


def completion_metrics(outcomes: Sequence[tuple[Reward, int, str]]) -> dict[str, float]:
    """A step's figures from its completions' `(reward, response length, finish reason)`: ``reward/mean``,
    ``reward/accuracy``, ``reward/format_rate``, ``reward/formatted_but_wrong``, ``reward/not_applicable`` (each
    only when the rewards speak for it: `tinyrl.task.reward_rates`), error counts, the components, and response
    lengths and clip rate."""
    rewards = [r for r, _, _ in outcomes]
    lengths = [length for _, length, _ in outcomes]
    metrics: dict[str, float] = {}
    # figures the rewards cannot speak for (accuracy without a correctness signal) are left out, not made up
    rates = reward_rates(rewards)
    for name, key in (("mean", "mean_reward"), ("accuracy", "accuracy"), ("format_rate", "format_rate"),
                      ("formatted_but_wrong", "formatted_but_wrong"), ("not_applicable", "not_applicable")):
        if rates[key] is not None:
            metrics[f"reward/{name}"] = float(rates[key])
    metrics["reward/errors"] = float(sum("error" in r.info for r in rewards))
    metrics["reward/printed_errors"] = float(sum(bool(r.info.get("printed")) for r in rewards))
    metrics.update(component_metrics(rewards, reserved=metrics))
    metrics["response/length_mean"] = float(np.mean(lengths))
    metrics["response/length_max"] = float(np.max(lengths))
    metrics["response/clip_rate"] = float(np.mean([finish == "length" for _, _, finish in outcomes]))
    metrics["train/completions"] = float(len(outcomes))
    return metrics


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


class RewardErrorLog:
    """Called by `RewardScorer` (``on_errors``) after a batch in which some reward failed or printed an error.

    Appends one JSON line per failure to ``path`` (``reward_errors.jsonl`` in the run directory): where it
    happened (``self.where``, e.g. "step 12"), the error, its traceback, the row and the completion; and one per
    printed line that looks like an error (``"printed"`` instead of ``"error"``). The first failure of each kind,
    and the first of each distinct printed line, is also logged at ERROR level with its row.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.where = ""
        self.seen: Counter[str] = Counter()

    def __call__(self, completions: Sequence[str], rows: Sequence[dict], rewards: Sequence[Reward]) -> None:
        lines = []
        for completion, row, reward in zip(completions, rows, rewards):
            lines += self._printed(completion, row, reward)
            error = error_of(reward)
            if error is None:
                continue
            kind = _kind(reward)
            trace = str(reward.info.get("traceback", ""))
            if not self.seen[kind]:
                log.error(
                    "reward error (%s), first of its kind: %s\n  row: %s\n  completion: %s\n%s%s",
                    self.where or "scoring", error, _clip(repr(row), _SHOWN_CHARS),
                    _clip(repr(completion), _SHOWN_CHARS), trace,
                    f"  every reward error is kept in {self.path}" if self.path else "",
                )
            self.seen[kind] += 1
            lines.append(json.dumps({
                "where": self.where, "error": error, "kind": kind, "traceback": trace,
                "row": _jsonable(row), "completion": _clip(completion, _KEPT_CHARS),
            }))
        if self.path is not None and lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")

    def _printed(self, completion: str, row: dict, reward: Reward) -> list[str]:
        printed = reward.info.get("printed") if isinstance(reward.info, dict) else None
        lines = []
        for line in printed or ():
            kind = _printed_kind(str(line))
            if not self.seen[kind]:
                log.error(
                    "reward code printed what looks like an error (%s), first of its kind: %s\n  row: %s\n"
                    "  completion: %s%s",
                    self.where or "scoring", line, _clip(repr(row), _SHOWN_CHARS), _clip(repr(completion), _SHOWN_CHARS),
                    f"\n  every such line is kept in {self.path}" if self.path else "",
                )
            self.seen[kind] += 1
            lines.append(json.dumps({
                "where": self.where, "printed": str(line), "kind": kind, "row": _jsonable(row),
                "completion": _clip(completion, _KEPT_CHARS),
            }))
        return lines

    def check(self, rewards: Sequence[Reward], limit: float | None, step: int, config_key: str) -> None:
        """Raise RewardsFailed when at least ``limit`` of one step's rewards failed (``limit=None``: never)."""
        if limit is None or not rewards:
            return
        failed = [r for r in rewards if error_of(r) is not None]
        if len(failed) < limit * len(rewards):
            return
        common, count = Counter(_kind(r) for r in failed).most_common(1)[0]
        example = next(error_of(r) for r in failed if _kind(r) == common)
        kept = f"; every error is in {self.path}" if self.path else ""
        raise RewardsFailed(
            f"step {step}: {len(failed)} of {len(rewards)} rewards failed (most often, {count} times: {example}); "
            f"the run stops because {config_key}={limit:g}{kept}",
            step=step, phase="score",
        )


def reward_error_summary(run_dir: str | Path) -> dict[str, Any]:
    """How many rewards of a run failed (and timed out) and how many printed lines looked like errors, counted from
    the run's ``reward_errors*.jsonl`` (every rank's); ``{}`` when there were none."""
    run_dir = Path(run_dir)
    failed = timeouts = printed = 0
    kinds: set[str] = set()
    for path in sorted(run_dir.glob("reward_errors*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short when a run was killed
                if "error" in record:
                    failed += 1
                    timeouts += record["error"] == "timeout"
                elif "printed" in record:
                    printed += 1
                kinds.add(str(record.get("kind")))
    if not (failed or printed):
        return {}
    return {"failed": failed, "timeouts": timeouts, "printed": printed, "kinds": len(kinds),
            "file": str(run_dir / "reward_errors.jsonl")}
