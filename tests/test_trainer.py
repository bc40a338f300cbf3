"""End-to-end RL on a real tiny transformer: every preset trains, GRPO learns, KL holds the policy near the
reference, dynamic sampling refills, a run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinyrl.compose import load_config
from tinyrl.models import load_policy
from tinyrl.experiment import train
from tinyrl.trainer import RLTrainer

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


def _config(tiny_model_dir, run_dir, *overrides):
    return load_config(
        [
            f"model.path={tiny_model_dir}",
            f"run_dir={run_dir}",
            f"task.name={TASK}",
            "task=custom",
            "task.train_size=64",
            "task.eval_size=8",
            "task.reward_workers=0",
            "sft.enabled=false",
            "rollout.n=4",
            "rollout.max_response_tokens=8",
            "rollout.max_prompt_tokens=64",
            "trainer.steps=2",
            "trainer.prompts_per_step=4",
            "trainer.prompts_per_mini_batch=2",
            "trainer.lr=1e-3",
            "trainer.critic_lr=1e-3",
            "trainer.micro_batch_tokens=64",
            "trainer.samples_every=1",
            "logging.progress=false",
            "logging.plot=false",
            "threads=1",
            *overrides,
        ]
    )


def _weights(path):
    model, _ = load_policy(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "gspo", "cispo", "ppo"])
def test_every_preset_trains(preset, tiny_model_dir, tmp_path):
    run = tmp_path / preset
    summary = train(_config(tiny_model_dir, run, f"algorithm={preset}"))
    assert summary["rl_steps"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "losses/policy" in r]
    assert len(steps) == 2
    for row in steps:
        assert all(v is None or isinstance(v, (int, float)) for v in row.values())
        assert row["losses/policy"] is not None and row["optim/grad_norm"] is not None
        assert row["time/generate"] > 0 and row["time/update"] > 0
    before, after = _weights(tiny_model_dir), _weights(run / "checkpoints" / "step_00000002" / "actor")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the update changed no weight"
    if preset == "ppo":
        assert (run / "checkpoints" / "step_00000002" / "critic" / "config.json").exists()
        assert all(r.get("losses/value") is not None for r in steps)


def test_grpo_raises_reward_on_a_learnable_task(tiny_model_dir, tmp_path):
    cfg = _config(
        tiny_model_dir, tmp_path / "learn", "algorithm=grpo", "algorithm.kl_coef=0", "trainer.steps=25",
        "trainer.prompts_per_step=8", "trainer.prompts_per_mini_batch=8", "rollout.n=8", "trainer.lr=3e-3",
        "trainer.micro_batch_tokens=4096", "trainer.samples_every=0",
    )
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 25
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last)


def _drift(tiny_model_dir, run_dir, kl_coef):
    cfg = _config(
        tiny_model_dir, run_dir, "algorithm=grpo", f"algorithm.kl_coef={kl_coef}", "algorithm.kl_estimator=k3",
        "algorithm.loss_agg=token-mean", "trainer.steps=12", "trainer.prompts_per_step=8",
        "trainer.prompts_per_mini_batch=4", "trainer.ppo_epochs=2", "trainer.lr=3e-3", "trainer.micro_batch_tokens=4096",
        "trainer.samples_every=0",
    )
    train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(r["policy/kl"] for r in rows[-4:] if "policy/kl" in r) / 4


def test_kl_term_keeps_the_policy_closer_to_the_reference(tiny_model_dir, tmp_path):
    loose = _drift(tiny_model_dir, tmp_path / "loose", 1e-6)
    tight = _drift(tiny_model_dir, tmp_path / "tight", 3.0)
    assert tight < loose * 0.5, (tight, loose)


def test_dynamic_sampling_drops_flat_groups_and_refills(tiny_model_dir, tmp_path):
    task = TASK.replace(":DigitTask", ":HalfConstantTask")
    cfg = _config(tiny_model_dir, tmp_path / "dapo", "algorithm=dapo", f"task.name={task}", "rollout.n=2",
                  "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4",
                  "algorithm.dynamic_sampling_max_rounds=4")
    trainer = RLTrainer.from_config(cfg)
    try:
        groups, scored = trainer._collect_groups(step=1)
    finally:
        trainer.close()
    drawn = [trainer.train_rows[i]["id"] for i, _, _ in scored[::2]]
    assert trainer.sampler.position == len(drawn)
    assert len(drawn) > 4, "flat groups were not refilled"
    assert all(trainer.train_rows[index]["id"] % 2 == 1 for index, _, _, _ in groups), "a flat group was kept"
    odd_drawn = sum(i % 2 for i in drawn)
    assert len(groups) == min(4, odd_drawn)
    for _, members, shaped, _ in groups:
        assert max(shaped) > min(shaped)


def test_trainer_without_dynamic_sampling_keeps_flat_groups(tiny_model_dir, tmp_path):
    task = TASK.replace(":DigitTask", ":HalfConstantTask")
    cfg = _config(tiny_model_dir, tmp_path / "grpo", "algorithm=grpo", f"task.name={task}", "rollout.n=2")
    trainer = RLTrainer.from_config(cfg)
    try:
        groups, _ = trainer._collect_groups(step=1)
    finally:
        trainer.close()
    assert len(groups) == 4 and trainer.sampler.position == 4


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_skipping_rows_without_advantage_gives_the_same_update(agg, tiny_model_dir, tmp_path):
    from tinyrl.batch import build_batch

    cfg = _config(tiny_model_dir, tmp_path / "cfg", "algorithm=grpo", "algorithm.kl_coef=0",
                  f"algorithm.loss_agg={agg}", "trainer.micro_batch_tokens=40")
    generator = torch.Generator().manual_seed(0)
    prompts = [[5 + i, 6, 7][: 1 + i % 3] for i in range(8)]
    responses = [torch.randint(3, 300, (2 + i,), generator=generator).tolist() for i in range(8)]
    updated = []
    for skip in (True, False):
        trainer = RLTrainer.from_config(cfg, run_dir=tmp_path / str(skip))
        trainer._loss_vanishes_without_advantage = lambda skip=skip: skip
        batch = build_batch(prompts, responses, [0.0] * 8, [0, 0, 1, 1, 2, 2, 3, 3], pad_id=0)
        advantages = torch.randn(8, batch.response_width, generator=torch.Generator().manual_seed(1))
        advantages[:4] = 0.0  # two groups without a learning signal
        batch.advantages = advantages * batch.response_mask
        stats = trainer._optimizer_step(batch, list(range(8)), step=1, on_policy=True)
        trainer.close()
        if skip:
            assert stats["train/rows_with_signal"] == 0.5
        updated.append({k: v.detach().clone() for k, v in trainer.policy.state_dict().items()})
    for name in updated[0]:
        torch.testing.assert_close(updated[0][name], updated[1][name], atol=1e-7, rtol=1e-6)


def test_rollout_logprobs_equal_a_recomputed_old_policy_pass(tiny_model_dir, tmp_path):
    """The trainer reuses the transformers engine's log-probs as pi_old; they must match a fresh forward pass."""
    from tinyrl.policy_ops import batched_logprobs

    cfg = _config(tiny_model_dir, tmp_path / "lp", "algorithm=grpo", "rollout.temperature=0.8", "rollout.n=3")
    trainer = RLTrainer.from_config(cfg)
    try:
        assert trainer._rollout_logprobs_are_exact()
        groups, _ = trainer._collect_groups(step=1)
        batch = trainer._assemble(groups)
        recomputed = batched_logprobs(trainer.policy, batch, 10_000, 0.8, trainer.device, trainer.dtype)
    finally:
        trainer.close()
    torch.testing.assert_close(batch.rollout_logprobs * batch.response_mask, recomputed * batch.response_mask,
                               atol=1e-4, rtol=0)
    assert batch.response_mask.sum() > 10


def test_non_finite_updates_are_skipped_then_stop_the_run_naming_step_and_phase(tiny_model_dir, tmp_path):
    from tinyrl.monitor import TrainingError

    cfg = _config(tiny_model_dir, tmp_path / "nan", "algorithm=grpo", "algorithm.kl_coef=0",
                  "algorithm.entropy_coef=0.01", "trainer.max_bad_steps=2",
                  "trainer.prompts_per_mini_batch=4")  # one optimizer update per RL step
    trainer = RLTrainer.from_config(cfg)
    try:
        with torch.no_grad():
            trainer.policy.get_input_embeddings().weight.fill_(float("nan"))  # a diverged model
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        first = trainer.step()
        assert first["optim/skipped"] == 1.0
        after = trainer.policy.state_dict()
        for name in before:  # the skipped update touched nothing (NaN == NaN compared as equal)
            assert torch.equal(before[name].nan_to_num(7.0), after[name].nan_to_num(7.0)), name
        with pytest.raises(TrainingError, match=r"step 2, phase update: non-finite"):
            trainer.step()
    finally:
        trainer.close()


def test_custom_task_file_trains_end_to_end(tiny_model_dir, tmp_path):
    """examples/custom_task.py, loaded by path: distilled from its own demonstrations, then one GRPO step."""
    example = Path(__file__).resolve().parents[1] / "examples" / "custom_task.py"
    cfg = _config(tiny_model_dir, tmp_path / "letters", f"task.name={example}:SortLetters", "sft.enabled=true",
                  "sft.steps=5", "sft.num_traces=16", "sft.batch_size=4", "trainer.steps=1",
                  "rollout.max_prompt_tokens=200", "rollout.max_response_tokens=64")
    summary = train(cfg)
    assert summary["rl_steps"] == 1 and summary["sft_steps"] == 5
    samples = (tmp_path / "letters" / "samples.jsonl").read_text()
    assert "Sort" in samples or "sort" in samples or "letters" in samples


def test_environment_tokens_stay_out_of_the_loss(tiny_model_dir, tmp_path):
    """A task's environment (`feedback`) writes into the rollouts; the assembled batch masks exactly those tokens,
    the log-probs of the policy's own tokens still match a fresh pass, and the run trains to the end."""
    from tinyrl.policy_ops import batched_logprobs

    task = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTaskWithEnvironment"
    cfg = _config(tiny_model_dir, tmp_path / "env", f"task.name={task}", "rollout.max_response_tokens=12")
    trainer = RLTrainer.from_config(cfg)
    try:
        groups, _ = trainer._collect_groups(step=1)
        batch = trainer._assemble(groups)
        completions = [c for g in groups for c, _ in g.members]
        recomputed = batched_logprobs(trainer.policy, batch, 10_000, 1.0, trainer.device, trainer.dtype)
    finally:
        trainer.close()
    assert sum(len(c.environment_positions) for c in completions) > 0
    for row, c in enumerate(completions):
        expected = [0.0 if t in c.environment_positions else 1.0 for t in range(len(c.token_ids))]
        assert batch.response_mask[row, : len(c.token_ids)].tolist() == expected
    torch.testing.assert_close(batch.rollout_logprobs * batch.response_mask, recomputed * batch.response_mask,
                               atol=1e-4, rtol=0)
    summary = train(_config(tiny_model_dir, tmp_path / "env_run", f"task.name={task}", "rollout.max_response_tokens=12"))
    assert summary["rl_steps"] == 2
