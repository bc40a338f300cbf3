"""The memory plan against memory measured on this CPU: weights, gradients and AdamW state to the byte; the peaks
of an update and of sampling within the stated tolerance (activations are an estimate: the plan bounds an
update's measured peak from above by at most 25%, and a sampling peak within 25% either way).

Peaks are measured with the PyTorch profiler's memory timeline (every CPU tensor allocation and free) around
the trainer's real update and the transformers engine's real sampling, float32 on CPU. On GPU the compute dtype
is bf16 and the same terms apply at 2 bytes; only a GPU run can confirm those figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyrl.batch import build_batch
from tinyrl.compose import load_config
from tinyrl.models import build_tiny_model
from tinyrl.plan import GIB, KNOWN_SHAPES, measured_peak_bytes, memory_plan
from tinyrl.rollout import SamplingConfig
from tinyrl.trainer import RLTrainer

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"
PROMPT, RESPONSE, ROWS = 32, 96, 16
SAMPLED = 24  # decode steps in the sampling measurement (each one adds many profiler events)


@pytest.fixture(scope="module")
def plan_model(tmp_path_factory):
    """A model whose activations, not its weights, dominate an update (as for a 3B model's long sequences)."""
    from conftest import TINY_TEXTS

    path = tmp_path_factory.mktemp("plan") / "model"
    return build_tiny_model(path, TINY_TEXTS, vocab_size=2048, hidden_size=128, num_heads=4, num_kv_heads=2,
                            intermediate_size=512, num_layers=4, seed=0)


def _config(model_dir, run_dir, *extra):
    return load_config([
        f"model.path={model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}", "task.train_size=8",
        "task.eval_size=2", "task.reward_workers=0", "algorithm=grpo", "algorithm.kl_coef=0", "device=cpu",
        f"rollout.max_prompt_tokens={PROMPT}", f"rollout.max_response_tokens={RESPONSE}",
        f"trainer.micro_batch_tokens={ROWS * (PROMPT + RESPONSE)}", "logging.progress=false", "threads=1", *extra,
    ])


def _full_rows_batch():
    g = torch.Generator().manual_seed(0)
    batch = build_batch([torch.randint(3, 300, (PROMPT,), generator=g).tolist() for _ in range(ROWS)],
                        [torch.randint(3, 300, (RESPONSE,), generator=g).tolist() for _ in range(ROWS)],
                        [0.0] * ROWS, [i // 4 for i in range(ROWS)], pad_id=0)
    batch.advantages = torch.randn(ROWS, RESPONSE, generator=g)
    return batch  # one micro-batch of exactly trainer.micro_batch_tokens tokens


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_an_updates_state_exactly_and_bounds_its_peak(plan_model, tmp_path, checkpointing):
    cfg = _config(plan_model, tmp_path / "run", f"model.gradient_checkpointing={str(checkpointing).lower()}")
    trainer = RLTrainer.from_config(cfg)
    try:
        trainer.policy.train()
        grads = {}
        original_step = trainer.optimizer.step

        def step_and_measure(*args, **kwargs):
            grads["bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in trainer.policy.parameters())
            return original_step(*args, **kwargs)

        trainer.optimizer.step = step_and_measure
        stats = {}
        measured = measured_peak_bytes(lambda: stats.update(
            trainer._optimizer_step(_full_rows_batch(), list(range(ROWS)), step=1, on_policy=True)))
        assert "optim/skipped" not in stats
    finally:
        trainer.close()
    plan = memory_plan(cfg, world_size=1, gpu_gb=1.0, device="cpu")
    weights = sum(p.numel() * p.element_size() for p in trainer.policy.parameters())
    moments = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values())
    assert plan.components["policy weights (float32)"] == weights
    assert plan.components["policy gradients (float32)"] == grads["bytes"]
    assert plan.components["policy AdamW moments (float32)"] == moments
    assert 0.75 * plan.phases["update"] <= measured <= plan.phases["update"], (measured, plan.phases["update"])


def test_plan_estimates_the_sampling_peak(plan_model, tmp_path):
    cfg = _config(plan_model, tmp_path / "run", "rollout.n=1", "rollout.batch_size=64", "trainer.prompts_per_step=64",
                  "trainer.prompts_per_mini_batch=64", f"rollout.max_response_tokens={SAMPLED}")
    trainer = RLTrainer.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (PROMPT,), generator=g).tolist() for _ in range(64)]
    try:
        sampling = SamplingConfig(max_new_tokens=SAMPLED, temperature=1.0, seed=0)
        measured = measured_peak_bytes(lambda: trainer.engine.generate(prompts, sampling))
    finally:
        trainer.close()
    plan = memory_plan(cfg, world_size=1, gpu_gb=1.0, device="cpu")
    weights = plan.components["policy weights (float32)"]
    planned = plan.phases["generation"] - weights - plan.components["policy AdamW moments (float32)"]
    assert 0.75 * planned <= measured - weights <= 1.25 * planned, (measured - weights, planned)


def test_known_shapes_have_their_published_parameter_counts():
    assert KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"].parameters() == 494_032_768
    assert KNOWN_SHAPES["Qwen/Qwen2.5-1.5B"].parameters() == 1_543_714_304
    assert KNOWN_SHAPES["Qwen/Qwen2.5-3B"].parameters() == 3_085_938_688
    assert KNOWN_SHAPES["Qwen/Qwen2.5-7B"].parameters() == 7_615_616_512


@pytest.mark.parametrize("experiment", ["countdown_grpo_qwen3b", "countdown_ppo_qwen3b"])
def test_3b_presets_fit_two_80gb_gpus_with_headroom_and_not_one(experiment):
    cfg = load_config([f"experiment={experiment}"])
    two = memory_plan(cfg, world_size=2, gpu_gb=80)
    assert two.fits and two.peak < 0.8 * 80 * GIB, two.table()  # 10% headroom and 10% to spare
    assert not memory_plan(cfg, world_size=1, gpu_gb=80).fits


def test_tinyrl_plan_prints_the_table_and_the_verdict():
    done = subprocess.run(
        [sys.executable, "-c", "from tinyrl.cli import plan_main; plan_main()", "experiment=countdown_ppo_qwen3b",
         "--world-size", "2", "--gpu-gb", "80"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| critic AdamW moments (float32) | 11.50 |" in done.stdout
    assert "fits: peak" in done.stdout and "per GPU" in done.stdout


def test_a_model_the_plan_cannot_size_is_named():
    cfg = load_config(["experiment=countdown_grpo_qwen3b", "model.path=someone/unknown-model"])
    with pytest.raises(ValueError, match="model.path: no config.json at 'someone/unknown-model'"):
        memory_plan(cfg, world_size=2)
