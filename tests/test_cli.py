"""The installed entry points, run as real subprocesses: a sweep, evaluation of a checkpoint, SFT alone, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import LEARNABLE_TASK, one_step_overrides

BIN = Path(sys.executable).parent


def _run(args, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_multirun_sweep_runs_every_combination(tiny_model_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    _run([str(BIN / "tinyrl-train"), "-m", "algorithm=grpo,dr_grpo", "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
          *one_step_overrides(tiny_model_dir)], cwd=tmp_path)
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert len(summaries) == 4
    seen = set()
    for path in summaries:
        config = (path.parent / "config.yaml").read_text()
        algorithm = "dr_grpo" if "advantage: dr_grpo" in config else "grpo"
        seed = int(next(line for line in config.splitlines() if line.startswith("seed:")).split(":")[1])
        seen.add((algorithm, seed))
        assert json.loads(path.read_text())["rl_steps"] == 1
    assert seen == {("grpo", 0), ("grpo", 1), ("dr_grpo", 0), ("dr_grpo", 1)}


def test_eval_prints_accuracy_and_pass_at_k_of_a_checkpoint(tiny_model_dir, tmp_path):
    out = _run([str(BIN / "tinyrl-eval"), f"checkpoint={tiny_model_dir}", "task=custom",
                f"task.name={LEARNABLE_TASK}", "task.reward_workers=0", "size=6", "pass_k=4", "max_response_tokens=6",
                f"out={tmp_path / 'ev'}"], cwd=tmp_path)
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["n_problems"] == 6
    assert set(result["pass@k"]) == {"1", "2", "4"} or set(result["pass@k"]) == {1, 2, 4}
    assert 0.0 <= result["accuracy"] <= 1.0
    assert (tmp_path / "ev" / "eval" / "step_00000000.json").exists()


def test_sft_entry_point_distils_and_evaluates(tiny_model_dir, tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": f"Problem {i}: say digits.\n", "completion": "4242 4242"}) + "\n"
                              for i in range(20)))
    run = tmp_path / "sft_run"
    _run([str(BIN / "tinyrl-sft"), *one_step_overrides(tiny_model_dir), f"run_dir={run}", f"sft.traces_path={traces}",
          "sft.enabled=true", "sft.steps=40", "sft.batch_size=8", "sft.lr=3e-3", "trainer.steps=0"], cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 0 and summary["sft_steps"] == 40
    # the distilled model writes digits: the task's accuracy is the share of completions at least half digits
    assert summary["accuracy_before_rl"] >= 0.5
    assert (run / "sft_model" / "config.json").exists()


def test_plot_entry_point_writes_a_png(tiny_model_dir, tmp_path):
    run = tmp_path / "plotted"
    _run([str(BIN / "tinyrl-train"), *one_step_overrides(tiny_model_dir), f"run_dir={run}", "trainer.steps=2"],
         cwd=tmp_path)
    out = _run([str(BIN / "tinyrl-plot"), str(run)], cwd=tmp_path)
    png = Path(out.stdout.strip().splitlines()[-1])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_entry_point_exports_verl_parquet(tmp_path):
    out = tmp_path / "data"
    _run([str(BIN / "tinyrl-data"), f"out_dir={out}", "sizes.train=50", "sizes.validation=10", "sizes.test=10",
          "task=countdown", "task.kwargs.max_numbers=3"], cwd=tmp_path)
    from tinyrl.data import from_verl_rows, read_rows

    rows = read_rows(next(out.glob("train*.parquet")))
    assert len(rows) == 50 and rows[0]["data_source"] == "countdown"
    problems = from_verl_rows(rows)
    assert all(len(p["numbers"]) == 3 for p in problems)
