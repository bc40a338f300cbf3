"""`tinyrl-eval` on a checkpoint written by a run measures what the run measured: the run's task, task arguments,
held-out split and size, template and generation settings, unless the command line says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import LEARNABLE_TASK as TASK
from tinyrl.compose import load_config
from tinyrl.experiment import train

BIN = Path(sys.executable).parent
REPORT_ONLY = ("checkpoint", "split", "settings_from", "settings")


def _tinyrl_eval(args, cwd):
    return subprocess.run([str(BIN / "tinyrl-eval"), *args], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)


def _eval(args, cwd):
    result = _tinyrl_eval(args, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):]), result.stderr


def test_eval_of_a_run_checkpoint_uses_the_runs_settings(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    summary = train(load_config([
        f"model.path={tiny_model_dir}", f"run_dir={run}", "task=custom", f"task.name={TASK}", "task.train_size=32",
        "task.eval_size=6", "task.eval_split=validation", "task.reward_workers=0", "sft.enabled=false",
        "rollout.n=2", "rollout.max_response_tokens=7", "rollout.max_prompt_tokens=48", "trainer.steps=1",
        "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4", "trainer.samples_every=0",
        "logging.progress=false", "logging.plot=false", "threads=1",
    ]))
    actor = run / "checkpoints" / "step_00000001" / "actor"
    result, notice = _eval([f"checkpoint={actor}", "pass_k=0"], tmp_path)
    assert f"settings from {run / 'config.yaml'}" in notice
    # the same model, problems and settings as the run's own final evaluation: the same figures
    assert {k: v for k, v in result.items() if k not in REPORT_ONLY} == summary["eval_after_rl"]
    assert result["split"] == "validation" and result["n_problems"] == 6 and result["settings"]["task"] == TASK
    assert list(tmp_path.iterdir()) == [run]  # no cli.log in the current directory

    told, _ = _eval([f"checkpoint={actor}", "pass_k=0", "max_response_tokens=3", "size=4"], tmp_path)
    assert told["n_problems"] == 4 and told["response_length_max"] <= 3  # what the command line says wins
    assert told["settings"]["task"] == TASK and told["split"] == "validation"  # the rest still from the run

    # a run's step folder means its actor; a folder without a model, or no folder, is one line naming checkpoint
    step, _ = _eval([f"checkpoint={actor.parent}", "pass_k=0"], tmp_path)
    assert {k: v for k, v in step.items() if k not in REPORT_ONLY} == summary["eval_after_rl"]
    for wrong in (run / "checkpoints", run / "no_such_step"):
        refused = _tinyrl_eval([f"checkpoint={wrong}"], tmp_path)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and "checkpoint: " in lines[0] and str(wrong) in lines[0]

    # the training key for the same thing would be ignored: refused in one line, naming the key to give
    for key, instead in (("task.eval_size=4", "size="), ("task.eval_split=test", "split=")):
        refused = _tinyrl_eval([f"checkpoint={actor}", key], tmp_path)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert key.split("=")[0] in refused.stderr and instead in refused.stderr and not refused.stdout.strip()


def test_asking_for_more_problems_than_the_split_holds_is_one_line_naming_size(tiny_model_dir, tmp_path):
    refused = _tinyrl_eval([f"checkpoint={tiny_model_dir}", "size=100000"], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyrl-eval: size: Countdown.dataset: asked for 100000 test"), lines
