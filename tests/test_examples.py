"""The examples run as a user runs them: the sweep without the venv on PATH, the Python example twice in one
directory without the runs colliding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


def _tiny(model_dir):
    return [
        f"model.path={model_dir}", "task=custom", f"task.name={TASK}", "task.train_size=32", "task.eval_size=8",
        "task.reward_workers=0", "sft.enabled=false", "rollout.n=2", "rollout.max_response_tokens=6",
        "trainer.steps=1", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4",
        "trainer.samples_every=0", "logging.progress=false", "logging.plot=false", "threads=1",
    ]


def _env_without_venv_on_path():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    env.pop("PYTHON", None)
    if Path(sys.executable).resolve() != (REPO / ".venv" / "bin" / "python").resolve():
        env["PYTHON"] = sys.executable  # tests run from another environment: name it, as a user would
    return env


def test_sweep_script_runs_without_the_venv_on_path(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(["bash", str(REPO / "examples" / "sweep.sh"), f"hydra.sweep.dir={sweep}",
                             *_tiny(tiny_model_dir)], cwd=tmp_path, env=_env_without_venv_on_path(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4 and all(json.loads(p.read_text())["rl_steps"] == 1 for p in summaries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no cli.log, no runs/ beside it


def test_python_example_runs_twice_in_one_directory(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(2):
        result = subprocess.run([sys.executable, str(REPO / "examples" / "train_from_python.py"),
                                 *_tiny(tiny_model_dir)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "held-out accuracy" in result.stdout and "step 3: train reward" in result.stdout
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 4 and sum(name.endswith("_own_loop") for name in runs) == 2
