import math
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from tinyrl.metrics import MetricsWriter
from tinyrl.plots import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_synthetic_run(run_dir, steps=60, eval_every=20):
    with MetricsWriter(run_dir) as writer:
        for step in range(1, steps + 1):
            progress = step / steps
            writer.write(
                step,
                {
                    "reward/mean": 0.1 + 0.8 * progress + 0.05 * math.sin(step),
                    "reward/accuracy": 0.7 * progress,
                    "reward/format_rate": min(1.0, 0.2 + 1.5 * progress),
                    "response/length_mean": 200 - 80 * progress,
                    "response/length_max": 256,
                    "policy/kl": float("nan") if step == 1 else 0.002 * step,
                    "policy/entropy": 1.5 - progress,
                    "losses/policy": 0.01,
                    "time/generate": 1.0,
                },
            )
            if step % eval_every == 0:
                writer.write(
                    step,
                    {"eval/accuracy": 0.6 * progress, "eval/pass@1": 0.5 * progress, "eval/pass@4": 0.8 * progress},
                )


def read_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return imread(path)


def test_full_run_gives_a_five_panel_png(tmp_path):
    write_synthetic_run(tmp_path)
    path = plot_run(tmp_path)
    assert path == tmp_path / "curves.png"
    image = read_png(path)
    assert image.shape[:2] == (1020, 1200)  # 3 rows x 2 columns of 6.0 x 3.4 inch panels at 100 dpi
    pixels = image[..., :3].reshape(-1, 3)
    assert pixels.std() > 0.05  # not a blank canvas
    # matplotlib's default blue (tab:blue, #1f77b4) is drawn for the first series of each panel
    assert np.any(np.all(np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.02, axis=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temp file left


def test_missing_series_shrink_the_figure(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"reward/mean": step / 5, "losses/policy": 0.1})
    image = read_png(plot_run(tmp_path, tmp_path / "plots" / "reward.png", title="reward only"))
    assert image.shape[:2] == (340, 600)  # a single panel


def test_a_run_with_nothing_to_plot_gets_a_clear_error(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"losses/policy": 0.1})
    with pytest.raises(ValueError, match=r"metrics.jsonl has no plottable series \(looked for .*reward/mean"):
        plot_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_run(tmp_path / "missing")


def test_command_line_writes_the_png(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 4):
            writer.write(step, {"policy/entropy": 1.0 / step})
    out = tmp_path / "figure.png"
    result = subprocess.run(
        [sys.executable, "-m", "tinyrl.plots", str(tmp_path), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert read_png(out).shape[:2] == (340, 600)
    missing = subprocess.run(
        [sys.executable, "-m", "tinyrl.plots", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
