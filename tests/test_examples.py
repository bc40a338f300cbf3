"""The examples run as a user runs them: the sweep without the venv on PATH, the Python example twice in one
directory without the runs colliding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import one_step_overrides

REPO = Path(__file__).resolve().parents[1]


def _env_without_venv_on_path():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    env.pop("PYTHON", None)
    if Path(sys.executable).resolve() != (REPO / ".venv" / "bin" / "python").resolve():
        env["PYTHON"] = sys.executable  # tests run from another environment: name it, as a user would
    return env


def test_sweep_script_runs_without_the_venv_on_path(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(["bash", str(REPO / "examples" / "sweep.sh"), f"hydra.sweep.dir={sweep}",
                             *one_step_overrides(tiny_model_dir)], cwd=tmp_path, env=_env_without_venv_on_path(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4 and all(json.loads(p.read_text())["rl_steps"] == 1 for p in summaries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no cli.log, no runs/ beside it


def test_python_example_runs_twice_in_one_directory(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(2):
        result = subprocess.run([sys.executable, str(REPO / "examples" / "train_from_python.py"),
                                 *one_step_overrides(tiny_model_dir)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "held-out accuracy" in result.stdout and "step 3: train reward" in result.stdout
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 4 and sum(name.endswith("_own_loop") for name in runs) == 2
