"""The one-file custom task in examples/custom_task.py, loaded by path and used end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from tinyrl.data import export_dataset, export_from_config, from_verl_rows, read_rows
from tinyrl.reward_workers import RewardScorer
from tinyrl.task import available_tasks, get_task

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_task.py"
SPEC = "examples/custom_task.py:SortLetters"


@pytest.fixture
def task(monkeypatch):
    monkeypatch.chdir(REPO)  # the spec is a path relative to the working directory
    return get_task(SPEC)


def test_loads_by_path_and_registers_its_name(task):
    assert type(task).__name__ == "SortLetters" and task.name == "sort_letters"
    assert "sort_letters" in available_tasks()
    assert type(get_task("sort_letters", max_letters=5)) is type(task)
    assert type(get_task(f"{EXAMPLE}:SortLetters")) is type(task)  # same file, same class
    with pytest.raises(TypeError, match="max_letter"):
        get_task(SPEC, max_letter=5)


def test_problems_are_seeded_distinct_and_split_apart(task):
    train = task.dataset("train", 300, seed=0)
    assert train == task.dataset("train", 300, seed=0) and train != task.dataset("train", 300, seed=1)
    words = {r["letters"] for r in train}
    assert len(words) == 300 and all(4 <= len(w) <= 8 for w in words)
    held_out = {r["letters"] for s in ("validation", "test") for r in task.dataset(s, 100, seed=0)}
    assert not words & held_out


def test_verifier_and_teacher(task):
    row = {"letters": "banana"}
    assert task.prompt(row).endswith("Assistant: <think>") and '"banana"' in task.prompt(row)
    assert [m["role"] for m in task.messages(row)] == ["system", "user"]
    assert task.reward("<answer>aaabnn</answer>\nok", row).correct
    assert task.reward("<answer>banana</answer>", row).score == 0.1
    assert task.reward("aaabnn", row).score == 0.0
    for r in task.dataset("validation", 50, seed=2):
        assert task.reward(task.demonstration(r), r).correct


def test_scored_in_worker_processes(task):
    rows = task.dataset("test", 40, seed=3)
    completions = []
    for i, row in enumerate(rows):
        completions.append(
            [task.demonstration(row), f"<answer>{row['letters']}z</answer>", "no tags here", "<answer>"][i % 4]
        )
    with RewardScorer(task, workers=2, timeout=5.0) as scorer:
        rewards = scorer.score(completions, rows)
    assert [r.score for r in rewards] == [1.0, 0.1, 0.0, 0.1] * 10
    assert scorer.stats["errors"] == 0 and scorer.stats["timeouts"] == 0


def test_exported_and_read_back(task, tmp_path):
    paths = export_dataset(task, {"train": 30, "test": 10}, seed=0, out_dir=tmp_path, fmt="parquet")
    for path, split in zip(paths, ("train", "test")):
        verl = read_rows(path)
        assert {v["data_source"] for v in verl} == {"sort_letters"} and verl[0]["ability"] == "puzzle"
        rows = from_verl_rows(verl)
        assert rows == task.dataset(split, len(rows), seed=0)
        assert all(task.reward(task.demonstration(r), r).correct for r in rows)


def test_exported_through_the_data_config(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with initialize_config_module(config_module="tinyrl.conf", version_base="1.3"):
        cfg = compose(
            "data",
            overrides=["task=custom", f"task.name={SPEC}", "+task.kwargs.max_letters=5", f"out_dir={tmp_path}",
                       "format=jsonl"],
        )
    cfg.sizes = {"train": 12}
    (path,) = export_from_config(cfg)
    rows = from_verl_rows(read_rows(path))
    assert len(rows) == 12 and all(len(r["letters"]) <= 5 for r in rows)


def test_runs_as_a_script():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("User: Write the letters of") == 3
    assert "-> score 1.0 correct=True" in out.stdout and "-> score 0.0 correct=False (no answer)" in out.stdout
