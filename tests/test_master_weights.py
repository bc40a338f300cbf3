"""Trained models hold float32 master weights whatever dtype their checkpoint was saved in.

Published checkpoints are mostly bfloat16 (Qwen2.5 is), and transformers loads a checkpoint in its own dtype by
default. Trained in bfloat16, an AdamW step of ~lr = 1e-6 on weights of ~1e-2 rounds to nothing (bfloat16 resolves
relative changes of 2^-8), so the run would silently not learn: measured on this tiny model before the fix, one
PPO step at lr 1e-6 changed 0.5% of the policy's weight elements from a bfloat16 checkpoint against 86% from the
same model saved in float32. Both ways into a run are checked: `RLTrainer.from_config` and the experiment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tinyrl.compose import load_config
from tinyrl.experiment import train
from tinyrl.models import build_tiny_model, float32_master_weights, load_critic, load_policy
from tinyrl.trainer import RLTrainer

from conftest import LEARNABLE_TASK, TINY_TEXTS


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """A tied-embedding model saved in bfloat16, as Qwen2.5 checkpoints are."""
    path = build_tiny_model(tmp_path_factory.mktemp("bf16") / "model", TINY_TEXTS, vocab_size=320, hidden_size=64,
                            num_heads=2, num_kv_heads=1, intermediate_size=128, num_layers=2, seed=0,
                            tie_word_embeddings=True, dtype="bfloat16")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    return path


def _overrides(model_dir, run_dir, *extra):
    return [
        f"model.path={model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={LEARNABLE_TASK}",
        "task.train_size=16", "task.eval_size=4", "task.reward_workers=0", "sft.enabled=false", "rollout.n=4",
        "rollout.max_response_tokens=8", "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4",
        "trainer.lr=1e-6", "trainer.critic_lr=1e-6", "trainer.samples_every=0", "logging.progress=false",
        "logging.plot=false", "threads=1", "device=cpu", *extra,
    ]


def _changed_share(before: dict, after: dict) -> float:
    changed = sum(int((before[k].float() != after[k].float()).sum()) for k in before)
    return changed / sum(t.numel() for t in before.values())


def test_loading_gives_float32_whatever_the_checkpoint_holds(bf16_model_dir):
    policy, _ = load_policy(bf16_model_dir)
    critic = load_critic(bf16_model_dir)
    frozen, _ = load_policy(bf16_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in policy.parameters()} == {p.dtype for p in critic.parameters()} == {torch.float32}
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}  # a frozen copy keeps what it asks for
    assert float32_master_weights(frozen) is frozen and {p.dtype for p in frozen.parameters()} == {torch.float32}
    assert frozen.lm_head.weight is frozen.model.embed_tokens.weight  # still tied after the cast
    assert float32_master_weights(None) is None


def test_from_config_trains_float32_master_weights_of_a_bf16_checkpoint(bf16_model_dir, tmp_path):
    cfg = load_config(_overrides(bf16_model_dir, tmp_path / "run", "algorithm=ppo", "algorithm.kl_coef=0.001"))
    trainer = RLTrainer.from_config(cfg)
    try:
        assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
        assert {p.dtype for p in trainer.critic.parameters()} == {torch.float32}
        assert {p.dtype for p in trainer.reference.parameters()} == {trainer.dtype}  # frozen: the compute dtype
        policy = {k: v.detach().clone() for k, v in trainer.policy.named_parameters()}
        critic = {k: v.detach().clone() for k, v in trainer.critic.named_parameters()}
        for _ in range(2):  # the critic's head starts at zero: its backbone gets a gradient from the second step on
            assert "optim/skipped" not in trainer.step()
        assert _changed_share(policy, dict(trainer.policy.named_parameters())) > 0.5
        assert _changed_share(critic, dict(trainer.critic.named_parameters())) > 0.5
    finally:
        trainer.close()


def test_a_trainer_given_a_bf16_policy_trains_it_in_float32(bf16_model_dir, tmp_path):
    """Research code may hand the trainer a model it loaded itself, in the checkpoint's bfloat16."""
    from transformers import AutoModelForCausalLM

    from tinyrl.task import get_task

    policy = AutoModelForCausalLM.from_pretrained(bf16_model_dir)  # transformers' default: the checkpoint's dtype
    assert policy.dtype == torch.bfloat16
    _, tokenizer = load_policy(bf16_model_dir)
    cfg = load_config(_overrides(bf16_model_dir, tmp_path / "run", "algorithm=grpo", "algorithm.kl_coef=0"))
    task = get_task(cfg.task.name)
    trainer = RLTrainer(cfg, tmp_path / "run", policy, tokenizer, task, task.dataset("train", 16, 0),
                        task.dataset("test", 4, 0))
    try:
        assert trainer.policy is policy and {p.dtype for p in policy.parameters()} == {torch.float32}
    finally:
        trainer.close()


def test_the_experiment_trains_float32_master_weights_of_a_bf16_checkpoint(bf16_model_dir, tmp_path):
    run = tmp_path / "run"
    train(load_config(_overrides(bf16_model_dir, run, "algorithm=grpo", "algorithm.kl_coef=0", "trainer.steps=1")))
    actor = Path(run) / "checkpoints" / "step_00000001" / "actor" / "model.safetensors"
    after = load_file(str(actor))
    before = load_file(str(bf16_model_dir / "model.safetensors"))
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert _changed_share(before, after) > 0.5
