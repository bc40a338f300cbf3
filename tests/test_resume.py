"""A run killed mid-way (SIGKILL) or stopped (SIGTERM) resumes exactly: same final weights, same metrics rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"
STEPS = 8


def _args(tiny_model_dir, run_dir, *extra):
    return [
        sys.executable, "-m", "tinyrl.train",
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}",
        "task.train_size=40", "task.eval_size=8", "task.reward_workers=1", "sft.enabled=false",
        "rollout.n=4", "rollout.max_response_tokens=8", "rollout.max_prompt_tokens=64",
        f"trainer.steps={STEPS}", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=2",
        "trainer.ppo_epochs=2", "trainer.lr=3e-3", "trainer.save_every=2", "trainer.keep_last=2",
        "trainer.samples_every=0", "logging.progress=false", "logging.plot=false", "threads=1",
        "algorithm=grpo", *extra,
    ]


def _rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def _final_weights(run_dir):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{STEPS:08d}" / "actor" / "model.safetensors"))


def _wait_for_step(proc, run_dir, step, timeout=180):
    path = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run ended early: {proc.stderr.read() if proc.stderr else ''}"
        if path.exists() and any(json.loads(line).get("step") == step and "reward/mean" in json.loads(line)
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never appeared in {path}")


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_args(tiny_model_dir, straight), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(_args(tiny_model_dir, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_step(proc, killed, 5)  # checkpoint at 4 exists; step 5's row must be rewound on resume
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "summary.json").exists()

    subprocess.run(_args(tiny_model_dir, killed, "resume=true"), check=True, env=_env(), capture_output=True, timeout=600)
    assert _rows(killed) == _rows(straight)
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
    discarded = (killed / "metrics.discarded.jsonl").read_text()
    assert '"step": 5' in discarded  # the killed run's step 5 was kept aside, not lost

    # resuming a finished run says so and changes nothing
    again = subprocess.run(_args(tiny_model_dir, killed, "resume=true"), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0
    assert "already finished" in again.stdout + again.stderr
    assert _rows(killed) == _rows(straight)


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same_run(tiny_model_dir, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ("trainer.save_every=0",)
    subprocess.run(_args(tiny_model_dir, straight, *args), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(_args(tiny_model_dir, stopped, *args), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, stopped, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "checkpoint saved" in out + err
    saved = sorted(p.name for p in (stopped / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(saved) == 1 and 3 <= int(saved[0].split("_")[1]) < STEPS

    subprocess.run(_args(tiny_model_dir, stopped, *args, "resume=true"), check=True, env=_env(), capture_output=True,
                   timeout=600)
    assert _rows(stopped) == _rows(straight)
    a, b = _final_weights(straight), _final_weights(stopped)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
