"""Short CPU training runs on a real tiny transformer, with problems from parquet files and reward code written for
TRL or veRL used unchanged; per-component reward metrics; what accuracy and format rate mean for TRL functions;
completions no TRL function applies to; reward errors shown, kept, counted in the closing lines and summary, and
stopping a broken run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyrl.compose import load_config
from tinyrl.console import summary_lines
from tinyrl.data import write_rows
from tinyrl.experiment import train
from tinyrl.reward_report import RewardsFailed

REPO = Path(__file__).resolve().parents[1]
WILD = str(Path(__file__).with_name("rewards_in_the_wild.py"))


def base_overrides(model_dir, run_dir, *extra) -> list[str]:
    return [
        f"model.path={model_dir}", f"run_dir={run_dir}", "task=file", "task.train_size=16", "task.eval_size=4",
        "task.reward_workers=1", "sft.enabled=false", "rollout.n=4", "rollout.max_response_tokens=8",
        "rollout.max_prompt_tokens=96", "trainer.steps=2", "trainer.prompts_per_step=2",
        "trainer.prompts_per_mini_batch=2", "trainer.lr=1e-3", "trainer.micro_batch_tokens=512",
        "trainer.samples_every=0", "logging.progress=false", "logging.plot=false", "threads=1", *extra,
    ]


def step_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def plain_parquet(path: Path, n: int = 16) -> Path:
    """TRL-style data: a `prompt` text column and the columns the reward functions read."""
    rows = [{"prompt": f"What is {i} + {i}? Put it in \\boxed{{}}.", "ground_truth": str(2 * i)} for i in range(n)]
    return write_rows(path, rows)


def chat_parquet(path: Path, n: int = 16) -> Path:
    """veRL-schema data with chat prompts."""
    rows = [
        {"data_source": "toy/sums", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
         "extra_info": {"split": "train" if i < n - 4 else "test", "index": i}}
        for i in range(n)
    ]
    return write_rows(path, rows)


def test_a_trl_documentation_style_reward_function_trains(tiny_model_dir, tmp_path):
    data = plain_parquet(tmp_path / "train.parquet")
    run = tmp_path / "trl_doc"
    cfg = load_config(base_overrides(
        tiny_model_dir, run, f"task.kwargs.train_file={data}", "task.eval_split=train",
        f"task.kwargs.reward_funcs=[{WILD}:boxed_match_reward,{WILD}:length_reward]", "task.kwargs.reward_weights=[1.0,0.5]",
    ))
    summary = train(cfg)
    assert summary["rl_steps"] == 2
    steps = step_metrics(run)
    assert len(steps) == 2
    for row in steps:
        assert row["reward/errors"] == 0.0
        assert 0.0 <= row["reward/boxed_match_reward"] <= 1.0 and 0.0 < row["reward/length_reward"] <= 1.0
        assert row["reward/mean"] == pytest.approx(row["reward/boxed_match_reward"] + 0.5 * row["reward/length_reward"])
    assert not (run / "reward_errors.jsonl").exists()


def test_functions_from_trl_rewards_train_on_chat_prompts(tiny_model_dir, tmp_path):
    data = chat_parquet(tmp_path / "all.parquet")
    run = tmp_path / "trl_rewards"
    cfg = load_config(base_overrides(
        tiny_model_dir, run, f"task.kwargs.train_file={data}", "task.kwargs.split_key=extra_info.split",
        "model.template=chat", "task.kwargs.chat_prefix='<think>'",
        "task.kwargs.reward_funcs=[trl.rewards.think_format_reward]",
    ))
    cfg.task.kwargs["reward_funcs"].append(  # a TRL factory with its arguments, as in a YAML preset
        {"path": "trl.rewards:get_soft_overlong_punishment", "kwargs": {"max_completion_len": 8, "soft_punish_cache": 4}}
    )
    summary = train(cfg)
    assert summary["rl_steps"] == 2 and summary["eval_problems"] == 4
    for row in step_metrics(run):
        assert row["reward/errors"] == 0.0
        assert row["reward/think_format_reward"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
        assert -1.0 <= row["reward/soft_overlong_punishment_reward"] <= 0.0
    # The chat template rendered the prompts the policy saw, and the workers read the parquet rows' columns.
    eval_file = next((run / "eval").glob("*.json"))
    assert "<|im_start|>user" in eval_file.read_text()


def test_a_verl_compute_score_trains_on_a_verl_preprocessed_file(tiny_model_dir, tmp_path):
    from test_file_task import write_like_verl_gsm8k

    write_like_verl_gsm8k(tmp_path)
    run = tmp_path / "verl"
    cfg = load_config(base_overrides(
        tiny_model_dir, run, f"task.kwargs.train_file={tmp_path / 'train.parquet'}",
        f"task.kwargs.test_file={tmp_path / 'test.parquet'}", f"task.kwargs.compute_score={WILD}:compute_score_dict",
        "task.kwargs.correct_score=2.0", "rollout.max_prompt_tokens=192",
    ))
    summary = train(cfg)
    assert summary["rl_steps"] == 2
    for row in step_metrics(run):
        assert row["reward/errors"] == 0.0
        assert row["reward/acc"] == row["reward/accuracy"]  # the dict's acc is the accuracy signal
        assert row["reward/length"] > 0  # its other numeric keys are logged


def test_countdown_logs_correct_and_format_components(tiny_model_dir, tmp_path):
    run = tmp_path / "countdown"
    overrides = [o for o in base_overrides(tiny_model_dir, run) if o != "task=file"]
    train(load_config([*overrides, "task=countdown_tiny", "task.kwargs.format_score=0.1"]))
    for row in step_metrics(run):
        assert set(row) >= {"reward/correct", "reward/format"}
        assert row["reward/mean"] == pytest.approx(row["reward/correct"] + row["reward/format"])
        assert row["reward/format"] == pytest.approx(0.1 * row["reward/formatted_but_wrong"])


def test_a_reward_that_always_fails_stops_the_run_with_its_error_shown(tiny_model_dir, tmp_path):
    data = plain_parquet(tmp_path / "train.parquet")
    run = tmp_path / "broken"
    overrides = base_overrides(
        tiny_model_dir, run, f"task.kwargs.train_file={data}", "task.eval_split=train",
        f"task.kwargs.reward_funcs=[{WILD}:divides_by_zero]",
    )
    # Through the command line: the first error of its kind with traceback and row, then one line, exit status 1.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tinyrl.train", *overrides], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert output.count("first of its kind") == 1  # 8 completions at evaluation failed the same way: shown once
    assert "ZeroDivisionError: division by zero" in output
    assert "Traceback (most recent call last)" in output and "'ground_truth': '" in output  # traceback and row
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tinyrl-train: step 1: 8 of 8 rewards failed") and "task.reward_error_limit=1" in last
    errors = [json.loads(line) for line in (run / "reward_errors.jsonl").read_text().splitlines()]
    assert len(errors) == 4 + 8  # the evaluation before RL (4 problems) and step 1 (2 prompts x 4)
    assert {e["where"] for e in errors} == {"evaluation at step 0", "step 1"}
    assert all("ZeroDivisionError" in e["error"] and e["traceback"] and "prompt" in e["row"] for e in errors)

    # With the stop turned off the run goes on, scoring those rewards 0 and counting them; its closing lines and
    # summary.json say how many failed and where they are.
    tolerant = tmp_path / "tolerant"
    cfg = load_config([*overrides, f"run_dir={tolerant}", "task.reward_error_limit=null"])
    summary = train(cfg)
    assert summary["rl_steps"] == 2
    assert [r["reward/errors"] for r in step_metrics(tolerant)] == [8.0, 8.0]
    failed = 4 + 8 + 8 + 4  # evaluation before RL, two steps, evaluation after
    expected = {"failed": failed, "timeouts": 0, "printed": 0, "kinds": 1, "file": str(tolerant / "reward_errors.jsonl")}
    assert summary["reward_errors"] == expected
    assert json.loads((tolerant / "summary.json").read_text())["reward_errors"] == expected
    assert f"{failed} rewards failed and scored 0 during this run; every one is in {tolerant / 'reward_errors.jsonl'}" \
        in summary_lines(summary)

    with pytest.raises(RewardsFailed, match="step 1: 8 of 8"):
        train(load_config([*overrides, f"run_dir={tmp_path / 'again'}"]))


def test_trl_accuracy_and_format_come_from_the_functions_named_for_them(tiny_model_dir, tmp_path):
    data = plain_parquet(tmp_path / "train.parquet")
    run = tmp_path / "named"
    summary = train(load_config(base_overrides(
        tiny_model_dir, run, f"task.kwargs.train_file={data}", "task.eval_split=train",
        f"task.kwargs.reward_funcs=[{WILD}:never_formatted,{WILD}:exact_answer,{WILD}:length_reward]",
        "task.kwargs.formatted_from=never_formatted", "task.kwargs.correct_from=exact_answer",
    )))
    for row in step_metrics(run):
        # a tag check that fails every completion: nothing is formatted, so nothing is "formatted but wrong"
        assert row["reward/never_formatted"] == 0.0
        assert row["reward/format_rate"] == 0.0 and row["reward/formatted_but_wrong"] == 0.0
        assert row["reward/accuracy"] == row["reward/exact_answer"]  # correct: exact_answer >= correct_score (1.0)
    assert summary["accuracy_after_rl"] == summary["eval_after_rl"]["accuracy"] is not None
    assert summary["eval_after_rl"]["format_rate"] == 0.0


def test_without_named_functions_no_accuracy_is_reported_and_unscorable_completions_train(tiny_model_dir, tmp_path):
    data = plain_parquet(tmp_path / "train.parquet")
    run = tmp_path / "unnamed"
    summary = train(load_config(base_overrides(
        tiny_model_dir, run, f"task.kwargs.train_file={data}", "task.eval_split=train", "trainer.steps=3",
        f"task.kwargs.reward_funcs=[{WILD}:length_unless_divisible]",
    )))
    steps = step_metrics(run)
    assert len(steps) == 3 and summary["rl_steps"] == 3
    for row in steps:
        assert "reward/accuracy" not in row and "reward/format_rate" not in row
        assert "reward/formatted_but_wrong" not in row and row["reward/errors"] == 0.0
    # completions the only function returned None for: not applicable, left out of the mean, not an error
    assert sum(row["reward/not_applicable"] for row in steps) > 0
    assert summary["accuracy_before_rl"] is None and summary["accuracy_after_rl"] is None
    assert summary["eval_after_rl"]["format_rate"] is None and summary["eval_after_rl"]["mean_reward"] is not None
    assert "accuracy not reported" in summary_lines(summary)[0]
    assert summary["reward_errors"] == {}
