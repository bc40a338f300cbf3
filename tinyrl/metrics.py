"""Run records: `metrics.jsonl` (append-only, one row per step), optional TensorBoard/W&B sinks, and sample
completions with reward-hacking signals for a person to read. (What a run prints is tinyrl/console.py.)

`metrics.jsonl` is the source of truth: rows are appended, flushed and fsynced one at a time and never rewritten.
On resume, rows written after the checkpoint are moved (not deleted) to `metrics.discarded.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinyrl.task import Reward

__all__ = [
    "METRICS_FILE",
    "DISCARDED_FILE",
    "SAMPLES_JSONL",
    "SAMPLES_MD",
    "MetricsWriter",
    "NullWriter",
    "rewind_metrics",
    "read_metrics",
    "write_samples",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DISCARDED_FILE = "metrics.discarded.jsonl"
SAMPLES_JSONL = "samples.jsonl"
SAMPLES_MD = "samples.md"


def _metrics_path(path_or_run_dir: str | os.PathLike) -> Path:
    path = Path(path_or_run_dir)
    return path / METRICS_FILE if path.is_dir() else path


def _append_durably(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _number(key: str, value: Any) -> int | float | None:
    """A metric value as a JSON number; NaN/inf become None (JSON null)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, numbers.Number):
        value = value.item()  # 0-d torch tensor or numpy array
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}")


class MetricsWriter:
    """Appends `{"step": step, **metrics}` rows to `run_dir/metrics.jsonl`, one durable write per row.

    Optional sinks: `tensorboard=True` writes event files to `run_dir/tensorboard`; `wandb={...}` passes its
    items to `wandb.init` (`dir` defaults to `run_dir`; use `mode="offline"` without network).
    A partial last line left by a killed process is moved to `metrics.discarded.jsonl` on open.
    """

    def __init__(
        self, run_dir: str | os.PathLike, tensorboard: bool = False, wandb: dict[str, Any] | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        _discard_torn_tail(self.run_dir)
        self._tb = None
        self._wandb_run = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "MetricsWriter(tensorboard=True) needs the tensorboard package: pip install 'tinyrl[tensorboard]'"
                ) from exc
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if wandb is not None:
            if not isinstance(wandb, Mapping):
                raise TypeError(f"MetricsWriter: wandb must be a dict of wandb.init arguments, got {wandb!r}")
            try:
                import wandb as wandb_lib
            except ImportError as exc:
                raise ImportError(
                    "MetricsWriter(wandb=...) needs the wandb package: pip install 'tinyrl[wandb]'"
                ) from exc
            self._wandb_run = wandb_lib.init(**{"dir": str(self.run_dir), **wandb})
        self._file: IO[bytes] | None = open(self.path, "ab")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one row. Values must be numbers; NaN/inf are written as null so each line stays valid JSON."""
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"MetricsWriter.write: step must be an int >= 0, got {step!r}")
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"MetricsWriter.write: metric names must be non-empty strings, got {key!r}")
            if key == "step":
                raise ValueError("MetricsWriter.write: 'step' is reserved; pass it as the step argument")
            row[key] = _number(key, value)
        line = json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        finite = {k: v for k, v in row.items() if k != "step" and v is not None}
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, global_step=int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(finite, step=int(step))

    def offset(self) -> int:
        """Byte size of metrics.jsonl now: store it in a checkpoint and pass it to `rewind_metrics` on resume."""
        if self._file is not None:
            self._file.flush()
            return os.fstat(self._file.fileno()).st_size
        return self.path.stat().st_size if self.path.exists() else 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullWriter:
    """A `MetricsWriter` that keeps nothing: for processes that share a run but do not write its records."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _move_tail(run_dir: Path, offset: int) -> int:
    """Move the bytes of metrics.jsonl past `offset` to metrics.discarded.jsonl; return how many lines moved."""
    path = run_dir / METRICS_FILE
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read()
    if not tail:
        return 0
    if not tail.endswith(b"\n"):
        tail += b"\n"  # keep the discarded file line-aligned even when the last row was torn
    # Copy first, truncate second: a crash in between duplicates rows in the discard file but loses none.
    _append_durably(run_dir / DISCARDED_FILE, tail)
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    return tail.count(b"\n")


def _discard_torn_tail(run_dir: Path) -> None:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    logger.warning("%s ends with a partial row (a killed writer?); moving it to %s", path, DISCARDED_FILE)
    _move_tail(run_dir, cut)


def rewind_metrics(run_dir: str | os.PathLike, offset: int) -> int:
    """Truncate `run_dir/metrics.jsonl` to `offset` bytes, appending the cut rows to `metrics.discarded.jsonl`.

    Used on resume: rows after the checkpoint's offset belong to steps that will be re-run. Returns the number
    of rows moved. The offset must lie on a row boundary and within the file.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
        raise ValueError(f"rewind_metrics: offset must be an int >= 0, got {offset!r}")
    offset = int(offset)
    if not path.exists():
        if offset == 0:
            return 0
        raise FileNotFoundError(f"rewind_metrics: {path} is missing but the checkpoint expects {offset} bytes of it")
    size = path.stat().st_size
    if offset > size:
        raise ValueError(
            f"rewind_metrics: {path} has {size} bytes, fewer than the checkpoint's offset {offset}; "
            f"the file was truncated or replaced after the checkpoint was written"
        )
    if offset > 0:
        with open(path, "rb") as f:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                raise ValueError(f"rewind_metrics: offset {offset} is not at a row boundary of {path}")
    return _move_tail(run_dir, offset)


def read_metrics(path_or_run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (or of `run_dir/metrics.jsonl`), nulls as None.

    A partial last line (a writer killed mid-row) is skipped with a warning; a malformed line elsewhere raises
    an error naming the file and line.
    """
    path = _metrics_path(path_or_run_dir)
    if not path.exists():
        raise FileNotFoundError(f"read_metrics: no metrics file at {path}")
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn.strip():
        logger.warning("%s: skipping a partial last row (%d bytes)", path, len(torn))
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"read_metrics: {path}, line {number} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"read_metrics: {path}, line {number} is not an object with a 'step' key")
        rows.append(row)
    return rows


def _shortened(text: str, max_chars: int, keep: str = "head") -> str:
    if len(text) <= max_chars:
        return text
    cut = len(text) - max_chars
    return f"…{text[-max_chars:]}" if keep == "tail" else f"{text[:max_chars]}… [+{cut} chars]"


def _fenced(text: str) -> list[str]:
    """`text` verbatim in a Markdown code fence longer than any backtick run inside it (model output is
    arbitrary text: it must neither end the fence nor be rendered as markup)."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence, text.replace("\r", ""), fence]


def _first_logged_length(path: Path) -> float | None:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        first = f.readline()
    try:
        return float(json.loads(first)["signals"]["length_mean_chars"])
    except (ValueError, KeyError, TypeError):
        return None


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def write_samples(
    run_dir: str | os.PathLike,
    step: int,
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[Reward],
    max_rows: int = 8,
    response_lengths: Sequence[int] | None = None,
    max_chars: int = 600,
) -> dict[str, float]:
    """Append a step's example completions to `samples.jsonl` and to `samples.md` (plain text, readable with `less`).

    The step's reward-hacking signals are computed over all completions given, not only the rows shown:
    `formatted_wrong_rate` (formatted answers that are wrong), `length_mean_chars`, `length_mean_tokens`
    (when `response_lengths` are given) and `length_ratio_to_first` (mean length relative to the first step
    logged; a falling ratio is a length collapse). Rows shown are spread evenly over the batch so several
    prompts appear. Returns the signals.
    """
    n = len(completions)
    if n == 0:
        raise ValueError("write_samples: completions is empty")
    if len(prompts) != n or len(rewards) != n:
        raise ValueError(
            f"write_samples: prompts ({len(prompts)}), completions ({n}) and rewards ({len(rewards)}) "
            f"must have the same length"
        )
    if response_lengths is not None and len(response_lengths) != n:
        raise ValueError(f"write_samples: response_lengths has {len(response_lengths)} entries for {n} completions")
    if max_rows < 1:
        raise ValueError(f"write_samples: max_rows must be >= 1, got {max_rows}")
    for i, reward in enumerate(rewards):
        for attr in ("score", "correct", "formatted"):
            if not hasattr(reward, attr):
                raise TypeError(f"write_samples: rewards[{i}] has no .{attr}; expected tinyrl.task.Reward")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path = run_dir / SAMPLES_JSONL
    md_path = run_dir / SAMPLES_MD

    from tinyrl.task import reward_rates

    rates = reward_rates(rewards)  # None where the rewards cannot speak for a figure (shown as n/a)
    signals: dict[str, float | None] = {
        "n": n,
        "accuracy": rates["accuracy"],
        "format_rate": rates["format_rate"],
        "formatted_wrong_rate": rates["formatted_but_wrong"],
        "mean_reward": rates["mean_reward"],
        "length_mean_chars": sum(len(c) for c in completions) / n,
    }
    if response_lengths is not None:
        signals["length_mean_tokens"] = sum(int(x) for x in response_lengths) / n
    first = _first_logged_length(jsonl_path)
    if first is None:
        first = signals["length_mean_chars"]
    signals["length_ratio_to_first"] = signals["length_mean_chars"] / first if first > 0 else 1.0

    shown = max_rows if max_rows < n else n
    indices = sorted({round(j * (n - 1) / max(shown - 1, 1)) for j in range(shown)})
    rows = [
        {
            "index": i,
            "prompt": prompts[i],
            "completion": completions[i],
            "score": float(rewards[i].score) if math.isfinite(float(rewards[i].score)) else None,
            "correct": None if rewards[i].correct is None else bool(rewards[i].correct),
            "formatted": None if rewards[i].formatted is None else bool(rewards[i].formatted),
            **({"length_tokens": int(response_lengths[i])} if response_lengths is not None else {}),
        }
        for i in indices
    ]
    record = {"step": int(step), "signals": signals, "rows": rows}
    _append_durably(jsonl_path, (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))

    tokens = f", {signals['length_mean_tokens']:.1f} tokens" if "length_mean_tokens" in signals else ""
    lines = [] if md_path.exists() else [
        "# Sample completions",
        "",
        "Completions are spread over each logged batch and shown verbatim (prompts by their end). *formatted but "
        "wrong* is the share of all completions of the step that follow the answer format but are wrong; a length "
        "ratio falling well below 1 means responses are collapsing.",
        "",
    ]
    lines += [
        f"## step {int(step)}",
        "",
        f"accuracy {_shown(signals['accuracy'])} · format rate {_shown(signals['format_rate'])} · "
        f"formatted but wrong {_shown(signals['formatted_wrong_rate'])} · mean reward {_shown(signals['mean_reward'])} · "
        f"mean length {signals['length_mean_chars']:.1f} chars{tokens} "
        f"({signals['length_ratio_to_first']:.2f}× the first logged step) · {n} completions",
        "",
    ]
    for row in rows:
        score = "null" if row["score"] is None else f"{row['score']:.3g}"
        lines += [
            f"### completion {row['index']} · score {score} · correct {_yes_no(row['correct'])} · "
            f"formatted {_yes_no(row['formatted'])}",
            "",
            "prompt (end):",
            *_fenced(_shortened(row["prompt"], max_chars // 2, keep="tail")),
            "completion:",
            *_fenced(_shortened(row["completion"], max_chars)),
            "",
        ]
    _append_durably(md_path, ("\n".join(lines) + "\n").encode("utf-8"))
    return signals
