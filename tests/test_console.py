"""What a run prints: every long phase, training and held-out figures labelled, held-out accuracy whenever it is
measured, a closing summary pointing to curves and samples; Ctrl-C during distillation says what happened and how
to continue, and the continued run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tinyrl.compose import load_config
from tinyrl.console import held_out_line, summary_lines
from tinyrl.experiment import train
from tinyrl.console import Progress

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


def _distilling(run_dir, *extra):
    """A run that builds its own tiny model and tokenizer, distils it, then takes RL steps."""
    return [
        f"run_dir={run_dir}", "task=custom", f"task.name={TASK}", "task.train_size=40", "task.eval_size=8",
        "task.reward_workers=0", "model.tiny.vocab_size=300", "model.tiny.hidden_size=64", "model.tiny.num_heads=2",
        "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=128", "model.tiny.corpus_problems=40",
        "sft.enabled=true", "sft.num_traces=40", "sft.batch_size=8", "sft.lr=3e-3", "sft.warmup_steps=2",
        "rollout.n=2", "rollout.max_response_tokens=6", "rollout.max_prompt_tokens=32", "trainer.prompts_per_step=4",
        "trainer.prompts_per_mini_batch=4", "trainer.lr=1e-3", "logging.plot=false", "threads=1", *extra,
    ]


def test_a_run_prints_its_phases_labelled_figures_and_a_closing_summary(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(load_config(_distilling(run, "sft.steps=6", "trainer.steps=2", "trainer.eval_every=1",
                                            "trainer.samples_every=1", "logging.plot=true")))
    captured = capsys.readouterr()
    out = captured.out
    assert "Writing model shards" not in captured.err and "Loading weights" not in captured.err  # only our lines
    for phase in ("building a tiny Qwen2 and its tokenizer from 40 training problems",
                  f"loading the policy from {run / 'base_model'} on cpu",
                  "held-out evaluation before RL on 8 problems", "held-out evaluation after RL on 8 problems"):
        assert f"{phase} ..." in out, phase
    assert "distillation: 40 teacher traces, 6 steps of 8" in out and "distillation step 6/6 [" in out
    assert "RL step 2/2 [" in out and "| train reward " in out and "| train acc " in out
    before, after = summary["eval_before_rl"], summary["eval_after_rl"]
    assert held_out_line("before RL", before) in out
    assert "held-out accuracy at RL step 1: " in out  # measured mid-run (eval_every), printed at once
    assert held_out_line("after RL", after) in out
    closing = out.strip().splitlines()[-2:]
    assert closing == summary_lines(summary)
    assert closing[0].startswith(f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    assert f"see {run / 'curves.png'} and {run / 'samples.md'}" in closing[1]


def test_progress_labels_and_notes_between_lines():
    out = io.StringIO()
    progress = Progress(total_steps=4, stream=out, min_interval_s=1e9, label="distillation step")
    progress.update(1, {"loss": 2.5})
    assert not progress.update(2)  # rate-limited
    progress.note("held-out accuracy at RL step 2: 0.250 on 8 problems (greedy)")  # never rate-limited
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("distillation step 1/4 [") and lines[0].endswith("| loss 2.5")
    assert lines[1] == "held-out accuracy at RL step 2: 0.250 on 8 problems (greedy)"


def _popen(args, env):
    return subprocess.Popen([sys.executable, "-m", "tinyrl.train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_ctrl_c_during_distillation_says_how_to_continue_and_resumes_exactly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    extra = ("sft.steps=60", "sft.save_every=4", "trainer.steps=1", "trainer.samples_every=0")
    done = subprocess.run([sys.executable, "-m", "tinyrl.train", *_distilling(straight, *extra)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = _popen(_distilling(stopped, *extra), env)
    checkpoints = stopped / "sft" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "no distillation checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    message = err.strip().splitlines()[-1]
    assert message.startswith("tinyrl-train: distillation stopped at step ") and "checkpoint saved" in message
    assert f"rerun with run_dir={stopped} resume=true" in message
    assert not (stopped / "sft_model").exists()

    resumed = subprocess.run([sys.executable, "-m", "tinyrl.train", f"run_dir={stopped}", "resume=true"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing after step " in resumed.stdout
    a, b = load_file(str(straight / "sft_model" / "model.safetensors")), load_file(str(stopped / "sft_model" /
                                                                                        "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical distilled weights
    assert (straight / "sft" / "metrics.jsonl").read_text() == (stopped / "sft" / "metrics.jsonl").read_text()
    first, second = (json.loads((d / "summary.json").read_text()) for d in (straight, stopped))
    assert first["eval_before_rl"] == second["eval_before_rl"] and first["eval_after_rl"] == second["eval_after_rl"]
    assert not (stopped / "sft" / "checkpoints").exists()  # sft_model/ supersedes them


def test_closing_lines_name_the_best_baseline_arm(tmp_path):
    summary = {"run_dir": str(tmp_path), "eval_problems": 40, "eval_split": "test", "rl_steps": 2,
               "accuracy_before_rl": 0.25, "accuracy_after_rl": 0.5, "wall_seconds": 12.0,
               "baseline": {"best": "straight", "best_accuracy": 0.375, "rl_gain_over_best": 0.125,
                            "rl_gain_over_best_se": 0.05}}
    first, middle, last = summary_lines(summary)
    assert first.startswith("held-out accuracy 0.250 -> 0.500 (+25.0 points) on 40 test problems after 2 RL steps")
    assert middle == ("best distillation-only baseline in the RL phase's time (straight): held-out accuracy 0.375; "
                      "RL is +12.5 ± 5.0 points over it (paired standard error)")
    assert last == f"every figure is in {tmp_path / 'summary.json'}"
    del summary["baseline"]
    assert len(summary_lines(summary)) == 2
