"""The README's main command, shortened: `tinyrl-train` with the embedded CPU default experiment, as a subprocess
from an empty directory, nothing downloaded. The full-length figures are measured by benchmarks/bench_default_run.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_default_experiment_shortened(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "tinyrl-train"), f"run_dir={run}", "sft.steps=30", "sft.num_traces=500", "trainer.steps=2",
         "trainer.prompts_per_step=16", "trainer.prompts_per_mini_batch=8", "task.eval_size=40",
         "task.train_size=1000", "model.tiny.corpus_problems=500", "trainer.samples_every=1",
         # a format bonus gives the barely distilled model's groups reward variance, so both steps update
         "++task.kwargs.format_score=0.1",
         # the distillation-only arms after the RL arm: continued with the default's traces, and afresh with
         # straight-to-solution traces
         "baseline.enabled=true",
         "baseline.arms=[{name: continued},{name: straight, task_kwargs: {trace_misses: 0}, start: base}]"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("accuracy_before_rl", "accuracy_after_rl", "eval_problems", "rl_steps", "wall_seconds"):
        assert key in summary
    assert summary["eval_problems"] == 40 and summary["rl_steps"] == 2
    assert 0.0 <= summary["accuracy_before_rl"] <= 1.0 and 0.0 <= summary["accuracy_after_rl"] <= 1.0
    # the closing console lines give the same accuracies, the best baseline arm, and point to the files to open
    before, after = summary["accuracy_before_rl"], summary["accuracy_after_rl"]
    last = result.stdout.strip().splitlines()[-3:]
    assert last[0].startswith(f"held-out accuracy {before:.3f} -> {after:.3f}") and "after 2 RL steps" in last[0]
    assert last[1].startswith("best distillation-only baseline in the RL phase's time ")
    assert f"{run / 'curves.png'} and {run / 'samples.md'}" in last[2]
    # the baseline arms: priced in distillation steps from the RL phase's measured seconds, evaluated on the
    # same problems (the RL arm's final policy answers them again, identically)
    baseline = summary["baseline"]
    assert baseline["rl_accuracy_rechecked"] == summary["accuracy_after_rl"]
    extra = baseline["extra_steps"]
    assert extra == max(1, round(baseline["rl_seconds"] / baseline["sft_seconds_per_step"]))
    assert [(a["name"], a["start"], a["steps"]) for a in baseline["arms"]] == [
        ("continued", "distilled", extra), ("straight", "base", 30 + extra)]
    for arm in baseline["arms"]:
        assert abs(arm["rl_gain"] - (summary["accuracy_after_rl"] - arm["accuracy"])) < 1e-9
        assert arm["rl_gain_se"] >= 0.0
    assert baseline["best_accuracy"] == max(a["accuracy"] for a in baseline["arms"])
    for i in range(2):
        assert (run / "baselines" / f"arm{i}" / "model.safetensors").exists()
    config = (run / "config.yaml").read_text()
    assert "path: null" in config and "enabled: true" in config  # tiny model built locally, distillation on
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for key in ("reward/accuracy", "reward/format_rate", "response/length_mean", "response/clip_rate",
                "policy/entropy", "optim/grad_norm", "optim/lr", "time/generate", "time/score", "time/update",
                "time/sync"):
        assert key in train_rows[0], key
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "samples.md").exists()
    assert (run / "sft_model" / "model.safetensors").exists()
    assert (run / "checkpoints").is_dir()
