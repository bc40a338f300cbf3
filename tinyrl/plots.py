"""Learning-curve figure of a run: reward, accuracy (with eval points), response length, KL and entropy vs step.

Reads `run_dir/metrics.jsonl`; a panel whose series are all missing is left out, so a run without a KL term
or a critic still gets a figure. Uses matplotlib's Agg canvas directly (no global backend switch, no display).

Command line: `python -m tinyrl.plots RUN_DIR [-o OUT.png]`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinyrl.metrics import read_metrics

__all__ = ["PANELS", "PLOT_FILE", "plot_run", "main"]

PLOT_FILE = "curves.png"

# (panel title, y label, [(metric, legend label, drawn as a line (True) or as points (False))])
PANELS: tuple[tuple[str, str, tuple[tuple[str, str, bool], ...]], ...] = (
    ("Reward", "reward", (("reward/mean", "train mean reward", True), ("eval/mean_reward", "eval mean reward", False))),
    (
        "Accuracy",
        "share",
        (
            ("reward/accuracy", "train accuracy", True),
            ("reward/format_rate", "train format rate", True),
            ("eval/accuracy", "eval accuracy (greedy)", False),
        ),
    ),
    (
        "Response length",
        "tokens",
        (("response/length_mean", "mean length", True), ("response/length_max", "max length", True)),
    ),
    ("KL to reference", "KL", (("policy/kl", "policy/kl", True),)),
    ("Entropy", "nats/token", (("policy/entropy", "policy/entropy", True),)),
)
_PASS_AT = re.compile(r"^eval/pass@(\d+)$")


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(float(row["step"]))
            values.append(float(value))
    return steps, values


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` points (shorter at the start), so the curve never looks ahead."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Draw the run's curves to a PNG (default `run_dir/curves.png`) and return its path.

    Noisy training series are drawn faintly with a trailing moving average on top; eval metrics, including
    every `eval/pass@k`, are drawn as points on the reward and accuracy panels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    metrics_path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if run_dir.is_file():
        run_dir = run_dir.parent

    pass_keys = sorted(
        {key for row in rows for key in row if _PASS_AT.match(key)}, key=lambda k: int(_PASS_AT.match(k).group(1))
    )
    panels = []
    for panel_title, ylabel, series in PANELS:
        if panel_title == "Accuracy":
            series = series + tuple((key, key.removeprefix("eval/"), False) for key in pass_keys)
        drawn = [(key, label, line, *_series(rows, key)) for key, label, line in series]
        drawn = [d for d in drawn if d[3]]
        if drawn:
            panels.append((panel_title, ylabel, drawn))
    if not panels:
        wanted = sorted({key for _, _, series in PANELS for key, _, _ in series})
        raise ValueError(f"plot_run: {metrics_path} has no plottable series (looked for {', '.join(wanted)})")

    cols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.0 * cols, 3.4 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
    for ax, (panel_title, ylabel, drawn) in zip(axes, panels):
        for color, (key, label, line, steps, values) in zip(colors, drawn):
            if not line:
                ax.plot(steps, values, "o", color=color, markersize=4, label=label)
            elif len(values) >= 10:
                ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
                window = max(2, len(values) // 20)
                ax.plot(steps, _moving_average(values, window), color=color, linewidth=1.6,
                        label=f"{label} ({window}-step mean)")
            else:
                ax.plot(steps, values, color=color, linewidth=1.4, marker=".", label=label)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title if title is not None else run_dir.name)

    out_path = Path(out) if out is not None else run_dir / PLOT_FILE
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_path)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyrl-plot", description="Plot a run's learning curves to a PNG.")
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl (or the metrics.jsonl file itself)")
    parser.add_argument("-o", "--out", default=None, help=f"output PNG (default: RUN_DIR/{PLOT_FILE})")
    parser.add_argument("--title", default=None, help="figure title (default: the run directory's name)")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).exists():
        parser.error(f"run directory {args.run_dir} does not exist")
    path = plot_run(args.run_dir, args.out, title=args.title)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
