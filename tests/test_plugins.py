"""A task from another installed package: a tiny plugin registers through the `tinyrl.tasks` entry-point group,
is installed into a fresh virtualenv, shows in `tinyrl-tasks`, and trains by name there.

The fresh virtualenv sees tinyrl and its dependencies through a `.pth` file that adds this environment's
site-packages (so nothing is downloaded or reinstalled); the plugin itself is installed only there, with pip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tinyrl.task import ENTRY_POINT_GROUP, available_tasks

PLUGIN_PYPROJECT = f"""
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyrl-echo-plugin"
version = "0.1.0"

[project.entry-points."{ENTRY_POINT_GROUP}"]
echo_words = "tinyrl_echo_plugin:EchoWords"
"""

PLUGIN_CODE = '''
"""A tinyrl task shipped by another package."""

from tinyrl.task import Reward

WORDS = ["apple", "river", "stone", "cloud", "ember", "maple", "north", "quiet"]


class EchoWords:
    """Repeat the given word: a plugin task with only the members a task cannot do without.

    The reward is the share of the word's letters found in the completion.
    """

    def __init__(self, bonus: float = 0.0):
        self.bonus = bonus

    def dataset(self, split, size, seed):
        offset = {"train": 0, "validation": 3, "test": 5}[split]
        return [{"word": WORDS[(offset + seed + i) % len(WORDS)]} for i in range(size)]

    def prompt(self, row):
        return f"Say {row['word']}:"

    def reward(self, completion, row):
        share = sum(ch in completion for ch in row["word"]) / len(row["word"])
        return Reward(share + self.bonus, share == 1.0, True, {}, {"letters": share})
'''


def run(python: Path, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugin")
    package = root / "src"
    (package / "tinyrl_echo_plugin").mkdir(parents=True)
    (package / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (package / "tinyrl_echo_plugin" / "__init__.py").write_text(PLUGIN_CODE)

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(run(python, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip())
    here = sysconfig.get_paths()["purelib"]  # this environment: tinyrl (editable), torch, pip, setuptools
    (purelib / "_tinyrl_here.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    installed = run(python, ["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                             str(package)], root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (purelib / "tinyrl_echo_plugin" / "__init__.py").exists()  # installed there, not here
    return python


def test_the_plugin_is_listed_only_where_it_is_installed(plugin_venv, tmp_path):
    assert "echo_words" not in available_tasks()
    listed = run(plugin_venv, ["-c", "from tinyrl.cli import tasks_main; tasks_main()"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    (echo,) = [i for i, line in enumerate(lines) if line.startswith("echo_words ")]
    assert "plugin (tinyrl-echo-plugin): Repeat the given word" in lines[echo]
    assert lines[echo + 1].split("arguments:")[1].strip() == "bonus=0.0"
    for builtin in ("countdown", "multiplication", "math", "file"):
        assert any(line.startswith(f"{builtin} ") and "built-in:" in line for line in lines), builtin
    as_json = run(plugin_venv, ["-c", "from tinyrl.cli import tasks_main; tasks_main(['--json'])"], tmp_path)
    entries = {e["name"]: e for e in json.loads(as_json.stdout)}
    assert entries["echo_words"]["source"] == "plugin (tinyrl-echo-plugin)"


def test_training_on_the_plugin_task_by_name(plugin_venv, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    trained = run(plugin_venv, [
        "-m", "tinyrl.train", f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "task=custom",
        "task.name=echo_words", "+task.kwargs.bonus=0.5", "task.train_size=8", "task.eval_size=2",
        "task.reward_workers=1", "sft.enabled=false", "rollout.n=2", "rollout.max_response_tokens=6",
        "rollout.max_prompt_tokens=32", "trainer.steps=2", "trainer.prompts_per_step=2",
        "trainer.prompts_per_mini_batch=2", "trainer.samples_every=0", "logging.progress=false", "logging.plot=false",
        "threads=1",
    ], tmp_path)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["rl_steps"] == 2
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "reward/mean" in s]
    assert len(steps) == 2 and all(s["reward/errors"] == 0.0 for s in steps)
    # The plugin's reward ran in the workers of that environment: its bonus and its component are there.
    assert all(s["reward/mean"] == pytest.approx(s["reward/letters"] + 0.5) for s in steps)
