"""A resumed run keeps its own config; a used run directory is never reused silently.

The command line and Python (`load_config`, a plain dict to `train`) resolve a resume the same way: the run's saved
`config.yaml`, plus the given keys that are safe to change mid-run; any other change is refused, naming each key
with its saved and given values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinyrl.compose import config_from_dict, load_config
from tinyrl.config import ConfigError, TrainConfig
from tinyrl.experiment import experiment_config, run_rl, train

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


def _custom(tiny_model_dir, run_dir):
    """A run unlike the packaged default in every way that matters: model, task, batch sizes, steps, lr."""
    return [
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}",
        "task.train_size=40", "task.eval_size=8", "task.reward_workers=0", "sft.enabled=false",
        "rollout.n=4", "rollout.max_response_tokens=6", "rollout.max_prompt_tokens=64", "trainer.steps=2",
        "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=2", "trainer.lr=3e-3",
        "trainer.samples_every=0", "trainer.save_every=1", "logging.progress=false", "logging.plot=false",
        "threads=1",
    ]


def _cli(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tinyrl.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _saved(run_dir):
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())


def _metric_steps(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "reward/mean" in r]


def test_cli_resume_runs_the_saved_config_and_refuses_unsafe_overrides(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    first = _cli(_custom(tiny_model_dir, run), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    started_with = _saved(run)

    # the README's resume command, plus a longer run: nothing else given, so nothing else may change
    longer = _cli([f"run_dir={run}", "resume=true", "trainer.steps=3", "logging.progress=true"], tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resume: trainer.steps 2 -> 3" in longer.stdout and "resume: logging.progress False -> True" in longer.stdout
    now = _saved(run)
    assert now["trainer"] == {**started_with["trainer"], "steps": 3}
    assert now["logging"] == {**started_with["logging"], "progress": True}
    unchanged = ("trainer", "logging", "resume")
    assert {k: v for k, v in now.items() if k not in unchanged} == \
           {k: v for k, v in started_with.items() if k not in unchanged}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 3 and summary["eval_problems"] == 8
    assert summary["eval_before_rl"]["n_problems"] == summary["eval_after_rl"]["n_problems"] == 8
    assert _metric_steps(run) == [1, 2, 3]

    # changes that are not safe mid-run are refused in one line naming each key and both values
    metrics_before = (run / "metrics.jsonl").read_bytes()
    refused = _cli([f"run_dir={run}", "resume=true", "trainer.lr=0.1", "rollout.n=8", "task.eval_size=20"], tmp_path)
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in refused.stderr
    for expected in ("trainer.lr (saved 0.003, given 0.1)", "rollout.n (saved 4, given 8)",
                     "task.eval_size (saved 8, given 20)"):
        assert expected in message
    assert _saved(run) == now and (run / "metrics.jsonl").read_bytes() == metrics_before


def test_a_used_run_directory_is_refused_with_both_ways_out(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(load_config(_custom(tiny_model_dir, run)))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    again = _cli(_custom(tiny_model_dir, run), tmp_path)
    assert again.returncode == 2
    assert "resume=true" in again.stderr and "another run_dir" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing touched
    with pytest.raises(ConfigError, match="already used"):
        train(load_config(_custom(tiny_model_dir, run)))

    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(load_config(_custom(tiny_model_dir, empty)))["rl_steps"] == 2  # an empty directory is fine


def test_python_paths_resolve_a_resume_like_the_command_line(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(load_config(_custom(tiny_model_dir, run)))
    saved = load_config([f"run_dir={run}", "resume=true"])
    assert saved.trainer.prompts_per_step == 4 and saved.rollout.n == 4 and saved.model.path == str(tiny_model_dir)

    # a key set to the packaged default's value still counts as given (80 is the default's trainer.steps)
    from_overrides = load_config([f"run_dir={run}", "resume=true", "trainer.steps=80"])
    from_dict = config_from_dict({"run_dir": str(run), "resume": True, "trainer": {"steps": 80}})
    assert from_overrides == from_dict
    assert from_dict.trainer.steps == 80 and from_dict.trainer.prompts_per_step == 4

    for refused in (lambda: load_config([f"run_dir={run}", "resume=true", "trainer.lr=0.1"]),
                    lambda: train({"run_dir": str(run), "resume": True, "trainer": {"lr": 0.1}}),
                    lambda: load_config([f"run_dir={run}", "resume=true", "algorithm=dapo"])):
        with pytest.raises(ConfigError, match=r"refused to change .*\(saved .*, given .*\)"):
            refused()
    # a complete config (a TrainConfig built by hand) must agree with the saved one except on safe keys
    with pytest.raises(ConfigError, match=r"trainer\.prompts_per_step \(saved 4, given 64\)"):
        experiment_config(TrainConfig(run_dir=str(run), resume=True))

    summary = train(load_config([f"run_dir={run}", "resume=true", "trainer.steps=3"]))
    assert summary["rl_steps"] == 3 and _metric_steps(run) == [1, 2, 3]


def test_summary_never_compares_evaluations_on_different_problems():
    # a run whose held-out problems changed since they were measured before RL stops before any RL step
    with pytest.raises(ConfigError, match="held-out problems differ"):
        run_rl(None, {"eval_set": "0123456789abcdef", "accuracy_before_rl": 0.5}, [{"id": 1}], None)


def test_baseline_arms_added_to_a_finished_run_and_kept_when_resumed_again(tmp_path):
    """`baseline.enabled` is safe to turn on when resuming a finished run: the arms run after its RL arm. A run
    stopped during the arms keeps the ones it finished."""
    run = tmp_path / "run"
    common = [
        f"run_dir={run}", "task=custom", f"task.name={TASK}", "task.train_size=40", "task.eval_size=8",
        "task.reward_workers=0", "model.tiny.vocab_size=300", "model.tiny.hidden_size=64", "model.tiny.num_heads=2",
        "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=128", "model.tiny.corpus_problems=40",
        "sft.enabled=true", "sft.steps=4", "sft.num_traces=40", "sft.batch_size=8", "rollout.n=2",
        "rollout.max_response_tokens=6", "rollout.max_prompt_tokens=32", "trainer.steps=1",
        "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4", "logging.progress=false",
        "logging.plot=false", "threads=1",
    ]
    first = train(load_config(common))
    assert "baseline" not in first
    arms = ["baseline.enabled=true", "baseline.arms=[{name: continued},{name: fresh, start: base}]"]
    second = train(load_config([*common, "resume=true", *arms]))
    assert second["accuracy_after_rl"] == first["accuracy_after_rl"]  # the RL arm is not run again
    baseline = second["baseline"]
    extra = baseline["extra_steps"]
    assert [(a["name"], a["start"], a["steps"]) for a in baseline["arms"]] == [
        ("continued", "distilled", extra), ("fresh", "base", 4 + extra)]
    assert baseline["rl_accuracy_rechecked"] == first["accuracy_after_rl"]
    assert json.loads((run / "summary.json").read_text())["baseline"] == baseline
    # as if stopped after both arms finished but before the summary was written: nothing is distilled again
    kept = {i: (run / "baselines" / f"arm{i}" / "model.safetensors").stat().st_mtime_ns for i in range(2)}
    (run / "summary.json").write_text(json.dumps(first))
    third = train(load_config([*common, "resume=true", *arms]))
    assert third["baseline"]["arms"] == baseline["arms"]
    assert {i: (run / "baselines" / f"arm{i}" / "model.safetensors").stat().st_mtime_ns for i in range(2)} == kept
