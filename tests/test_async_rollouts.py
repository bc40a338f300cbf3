"""trainer.max_staleness: the engine (the transformers engine in a process of its own) samples the next batch while
the trainer updates. Which policy samples which batch follows the schedule whatever the timing; the rollout
correction weighs a stale batch by pi_old / pi_sampler; a killed run resumes exactly; a dead or hung engine stops the
run with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tinyrl.algorithms
from tinyrl.config import ConfigError
from tinyrl.models import load_policy
from tinyrl.policy_ops import batched_logprobs
from tinyrl.process_tree import descendants
from tinyrl.rollout import EngineFailed, SamplingConfig
from tinyrl.rollout.hf import HFEngine
from tinyrl.rollout.hf_process import HFProcessEngine
from tinyrl.sampler import PromptSampler
from tinyrl.trainer import RLTrainer, sampling_schedule, step_seed

from test_resume import _rows, _wait_for_step
from test_trainer import TASK, _config

ASYNC = ("trainer.max_staleness=1", "rollout.layout=server", "algorithm.rollout_correction.rollout_is=token")


def _metric_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows if "losses/policy" in row]


def _actor(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "actor" / "model.safetensors"))


def test_schedule_is_k_updates_behind():
    assert [sampling_schedule(s, 0) for s in range(1, 6)] == [0, 1, 2, 3, 4]
    assert [sampling_schedule(s, 1) for s in range(1, 6)] == [0, 0, 1, 2, 3]
    assert [sampling_schedule(s, 2) for s in range(1, 6)] == [0, 0, 0, 1, 2]


def test_the_engine_in_its_own_process_gives_the_in_process_numbers(tiny_model_dir, tmp_path):
    """max_staleness=1 with the transformers engine in the training process (which cannot overlap: it samples when
    the batch is submitted) and in a process of its own (which overlaps): the same completions and rewards, and
    the same losses and weights up to float rounding (the in-process engine's log-probs serve as pi_old for a batch
    that is not stale; the other process's are recomputed). So the timing of the overlap changes nothing."""
    common = ("algorithm=grpo", "trainer.steps=3", "trainer.samples_every=0", "trainer.lr=1e-2", *ASYNC[:1], ASYNC[2])
    from tinyrl.experiment import train

    train(_config(tiny_model_dir, tmp_path / "inside", *common))
    train(_config(tiny_model_dir, tmp_path / "process", *common, "rollout.layout=server"))
    inside, process = _metric_rows(tmp_path / "inside"), _metric_rows(tmp_path / "process")
    assert len(inside) == 3 and [r.keys() for r in inside] == [r.keys() for r in process]
    for a, b in zip(inside, process):
        exact = {k: v for k, v in a.items() if k.startswith(("reward/", "response/", "async/", "train/completions"))}
        assert exact == {k: b[k] for k in exact}
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert [row["async/sampler_version"] for row in process] == [0.0, 0.0, 1.0]
    a, b = _actor(tmp_path / "inside", 3), _actor(tmp_path / "process", 3)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=0)  # Adam magnifies rounding


def test_k1_trains_on_the_scheduled_batches_with_truncated_importance_weights(tiny_model_dir, tmp_path, monkeypatch):
    threshold = 1.02  # low enough that some tokens are truncated
    cfg = _config(tiny_model_dir, tmp_path / "run", "algorithm=grpo", "trainer.steps=3", "trainer.samples_every=0",
                  "trainer.lr=3e-2", *ASYNC, f"algorithm.rollout_correction.rollout_is_threshold={threshold}")
    trainer = RLTrainer.from_config(cfg)
    assert trainer.engine.overlaps_generation
    trained, batches, objective_calls = {}, {}, []

    score_groups, assemble, objective = trainer._score_groups, trainer._assemble, tinyrl.algorithms.rl_objective

    def record_completions(step, indices, completions, found, scored):
        trained[step] = (list(indices), [c.token_ids for c in completions])
        return score_groups(step, indices, completions, found, scored)

    def record_batch(groups):
        batches[trainer.step_count + 1] = batch = assemble(groups)
        return batch

    def record_objective(*args, **kwargs):
        loss, metrics = objective(*args, **kwargs)
        objective_calls.append((trainer.step_count + 1, args, kwargs, metrics))
        return loss, metrics

    monkeypatch.setattr(trainer, "_score_groups", record_completions)
    monkeypatch.setattr(trainer, "_assemble", record_batch)
    monkeypatch.setattr(tinyrl.algorithms, "rl_objective", record_objective)
    versions = [{k: v.clone() for k, v in trainer.policy.state_dict().items()}]  # the policy after each update
    rows = []
    try:
        for _ in range(3):
            rows.append(trainer.step())
            versions.append({k: v.clone() for k, v in trainer.policy.state_dict().items()})
    finally:
        trainer.close()
    assert [r["async/sampler_version"] for r in rows] == [0.0, 0.0, 1.0]  # steps 1, 2 from the start, 3 from update 1
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0]

    # every batch is what the scheduled policy samples from that step's prompts and seed, and not what the policy
    # one update newer would (so the check tells the two apart)
    model, tokenizer = load_policy(tiny_model_dir)
    engine = HFEngine(model, tokenizer)
    order = PromptSampler(len(trainer.train_rows), cfg.seed)
    differs = []
    for step in (1, 2, 3):
        indices = order.take(cfg.trainer.prompts_per_step)
        assert trained[step][0] == indices
        sampling = SamplingConfig(max_new_tokens=cfg.rollout.max_response_tokens, n=cfg.rollout.n,
                                  seed=step_seed(cfg.seed, step, 0), stop=tuple(trainer.task.stop))

        def sample(version):
            model.load_state_dict(versions[version])
            return [c.token_ids for c in engine.generate([trainer.train_prompts[i] for i in indices], sampling)]

        assert trained[step][1] == sample(sampling_schedule(step, 1))
        differs.append(sample(step - 1) != trained[step][1])
    assert differs[1:] == [True, True]

    # step 2 (sampled by policy 0, trained by policy 1): pi_old is recomputed by policy 1, the sampler's log-probs
    # are policy 0's, and each token's weight is min(exp(old - sampler), C)
    batch = batches[2]
    for version, logprobs in ((1, batch.old_logprobs), (0, batch.rollout_logprobs)):
        model.load_state_dict(versions[version])
        expected = batched_logprobs(model, batch, 4096, 1.0, torch.device("cpu"), torch.float32)
        mask = batch.response_mask > 0
        torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-4, rtol=0)
    ratio = torch.exp(batch.old_logprobs - batch.rollout_logprobs)[batch.response_mask > 0]
    assert (ratio > threshold).any() and (ratio <= threshold).any()
    calls = [call for call in objective_calls if call[0] == 2]
    assert calls
    for _, args, kwargs, metrics in calls:
        old, mask = args[2], args[4] > 0
        weights = torch.exp(old - kwargs["rollout_logprobs"])[mask]
        assert metrics["rollout/weight_mean"] == pytest.approx(float(weights.clamp(max=threshold).mean()), abs=1e-6)
        assert metrics["rollout/is_truncated_frac"] == pytest.approx(float((weights > threshold).double().mean()))
    assert rows[1]["rollout/mismatch_kl"] > 1e-3 > 1e-9 > rows[0]["rollout/mismatch_kl"]  # stale vs not stale


def _args(tiny_model_dir, run_dir, steps, *extra):
    return [
        sys.executable, "-m", "tinyrl.train",
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}",
        "task.train_size=40", "task.eval_size=8", "task.reward_workers=0", "sft.enabled=false",
        "rollout.n=4", "rollout.max_response_tokens=8", "rollout.max_prompt_tokens=64",
        f"trainer.steps={steps}", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=2",
        "trainer.ppo_epochs=2", "trainer.lr=3e-3", "trainer.save_every=2", "trainer.keep_last=2",
        "trainer.samples_every=0", "logging.progress=false", "logging.plot=false", "threads=1",
        "algorithm=grpo", *ASYNC, *extra,
    ]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_sigkill_during_an_overlapped_step_then_resume_matches_the_uninterrupted_run(tiny_model_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_args(tiny_model_dir, straight, 4), check=True, env=_env(), capture_output=True, timeout=600)

    proc = subprocess.Popen(_args(tiny_model_dir, killed, 4), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for_step(proc, killed, 3)  # the checkpoint of step 2 holds step 3's batch, sampled ahead
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = torch.load(killed / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=False)
    assert [(p["step"], p["version"]) for p in state["pending"]] == [(3, 1)]

    subprocess.run(_args(tiny_model_dir, killed, 4, "resume=true"), check=True, env=_env(), capture_output=True,
                   timeout=600)
    assert _rows(killed) == _rows(straight)
    assert [r["async/sampler_version"] for r in _rows(killed) if "async/sampler_version" in r] == [0, 0, 1, 2]
    a, b = _actor(straight, 4), _actor(killed, 4)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_dead_engine_stops_the_run_with_one_line_within_the_timeout(tiny_model_dir, tmp_path):
    timeout_s = 20
    proc = subprocess.Popen(_args(tiny_model_dir, tmp_path / "run", 200, f"rollout.timeout_s={timeout_s}"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, tmp_path / "run", 2)
    workers = [pid for pid in descendants(proc.pid)
               if b"tinyrl.rollout.hf_process" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=timeout_s + 30)
    assert time.monotonic() - killed_at < timeout_s
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("tinyrl-train: step ") and "rollout engine process" in last and "exited" in last


def test_a_hung_engine_fails_its_wait_within_the_timeout(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    engine = HFProcessEngine(model, tokenizer)
    try:
        os.kill(engine.pid, signal.SIGSTOP)
        pending = engine.submit([[1, 2, 3]], SamplingConfig(max_new_tokens=4, seed=0))
        started = time.monotonic()
        with pytest.raises(EngineFailed, match=r"did not finish within 2 s \(rollout.timeout_s\)"):
            pending.result(2.0)
        assert time.monotonic() - started < 4
    finally:
        os.kill(engine.pid, signal.SIGCONT)
        engine.close()


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_staleness=1"], "trainer.max_staleness: 1 trains on batches sampled by older policies"),
    (["trainer.max_staleness=1", "algorithm=dapo", "algorithm.rollout_correction.rollout_is=token"],
     "trainer.max_staleness: dynamic sampling"),
    (["trainer.max_staleness=-1"], "trainer.max_staleness: must be >= 0"),
])
def test_max_staleness_is_checked_before_anything_loads(overrides, message, tiny_model_dir, tmp_path):
    from tinyrl.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(_config(tiny_model_dir, tmp_path / "run", *overrides))


def test_max_staleness_under_torchrun_is_refused_at_start(tiny_model_dir, tmp_path):
    from tinyrl.preflight import check_engine_fits_launch

    cfg = _config(tiny_model_dir, tmp_path / "run", "trainer.max_staleness=1",
                  "algorithm.rollout_correction.rollout_is=token")
    check_engine_fits_launch(cfg, world_size=1)
    with pytest.raises(ConfigError, match="trainer.max_staleness: under torchrun each rank samples with a colocated"):
        check_engine_fits_launch(cfg, world_size=2)
