"""The memory plan against memory measured on this CPU: weights, gradients and AdamW state to the byte; the peaks
of an update and of sampling within the stated tolerance (activations are an estimate: the plan bounds an
update's measured peak from above by at most 25%, and a sampling peak within 25% either way).

Peaks are measured with the PyTorch profiler's memory timeline (every CPU tensor allocation and free) around
the trainer's real update and the transformers engine's real sampling, float32 on CPU. On GPU the compute dtype
is bf16 and the same terms apply at 2 bytes; only a GPU run can confirm those figures.
"""

from __future__ import annotations

import re
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
    planned = max(plan.phases["update"], plan.phases["optimizer step"])  # one _optimizer_step runs both
    assert 0.75 * planned <= measured <= planned, (measured, planned)


def test_lora_plan_matches_an_updates_state_exactly_and_bounds_its_peak(plan_model, tmp_path):
    pytest.importorskip("peft")
    cfg = _config(plan_model, tmp_path / "run", "model.lora.enabled=true", "model.lora.rank=8")
    trainer = RLTrainer.from_config(cfg)
    try:
        trainer.policy.train()
        stats = {}
        measured = measured_peak_bytes(lambda: stats.update(
            trainer._optimizer_step(_full_rows_batch(), list(range(ROWS)), step=1, on_policy=True)))
        assert "optim/skipped" not in stats
    finally:
        trainer.close()
    plan = memory_plan(cfg, world_size=1, gpu_gb=1.0, device="cpu")
    params = dict(trainer.policy.named_parameters())
    adapters = sum(p.numel() * p.element_size() for n, p in params.items() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for n, p in params.items() if not p.requires_grad)
    moments = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values())
    assert plan.components["frozen base weights (compute dtype)"] == frozen
    assert plan.components["LoRA adapter weights (float32)"] == adapters
    assert plan.components["LoRA adapter gradients (float32)"] == adapters  # one float32 gradient per adapter weight
    assert plan.components["LoRA adapter AdamW moments (float32)"] == moments
    assert "reference weights (compute dtype)" not in plan.components and "policy weights (float32)" not in plan.components
    planned = max(plan.phases["update"], plan.phases["optimizer step"])
    assert 0.75 * planned <= measured <= planned, (measured, planned)


def test_grpo_3b_with_lora_fits_one_80gb_gpu():
    lora = memory_plan(load_config(["experiment=countdown_grpo_qwen3b_lora"]), world_size=1, gpu_gb=80)
    full = memory_plan(load_config(["experiment=countdown_grpo_qwen3b"]), world_size=1, gpu_gb=80)
    assert lora.fits and not full.fits
    assert lora.components["LoRA adapter weights (float32)"] == 4 * 59_867_136  # rank 32 on all 7 linear x 36 layers
    assert lora.components["frozen base weights (compute dtype)"] == 2 * KNOWN_SHAPES["Qwen/Qwen2.5-3B"].parameters()


def test_plan_estimates_the_sampling_peak(plan_model, tmp_path):
    cfg = _config(plan_model, tmp_path / "run", "rollout.n=1", "algorithm.advantage=reinforce_pp",
                  "rollout.batch_size=64", "trainer.prompts_per_step=64", "trainer.prompts_per_mini_batch=64",
                  f"rollout.max_response_tokens={SAMPLED}")
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


def test_autocast_keeps_a_compute_dtype_copy_of_the_weights_through_a_pass(tmp_path):
    """The plan's "autocast copy" term (one process on a GPU): autocast casts each float32 weight to bf16 once per
    pass and keeps the copy until the pass ends, even without gradients. CUDA's autocast shares that cache with the
    CPU's, so the CPU's shows its size: a tied model's whole weight matrix set, in 2 bytes per element."""
    from conftest import TINY_TEXTS

    from tinyrl.models import load_policy

    path = build_tiny_model(tmp_path / "tied", TINY_TEXTS, vocab_size=2048, hidden_size=128, num_heads=4,
                            num_kv_heads=2, intermediate_size=512, num_layers=4, seed=0, tie_word_embeddings=True)
    model, _ = load_policy(path)
    ids = torch.tensor([[5, 6]])

    def forward(autocast: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids)

    extra = measured_peak_bytes(lambda: forward(True)) - measured_peak_bytes(lambda: forward(False))
    cfg = _config(path, tmp_path / "run")
    planned = memory_plan(cfg, world_size=1, gpu_gb=80).components["autocast copy of the weights (compute dtype), one process"]
    assert 0.9 * planned <= extra <= 1.1 * planned, (extra, planned)


def test_a_gpus_foreach_adamw_step_holds_one_float32_copy_of_the_parameters(plan_model, tmp_path):
    """The plan's "AdamW step temporary" on a GPU: foreach AdamW (the CUDA default) makes sqrt(v) for every
    parameter at once. Forced on the CPU, the same kernels show the same allocation."""
    from tinyrl.models import load_policy

    model, _ = load_policy(plan_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # the moments exist from here on
    tensors = [t for p in model.parameters() for t in (p, p.grad)]
    tensors += [t for state in optimizer.state.values() for t in state.values()]
    before = sum(t.numel() * t.element_size() for t in tensors)  # what the step starts with
    during = measured_peak_bytes(optimizer.step)
    planned = memory_plan(_config(plan_model, tmp_path / "run"), world_size=1, gpu_gb=80).components[
        "AdamW step temporary (float32)"]
    assert 0.9 * planned <= during - before <= 1.1 * planned, (during - before, planned)


@pytest.mark.parametrize("experiment", ["countdown_grpo_qwen3b", "countdown_ppo_qwen3b",
                                        "countdown_ppo_qwen3b_colocated"])
def test_3b_presets_fit_two_80gb_gpus_with_headroom_and_not_one(experiment):
    cfg = load_config([f"experiment={experiment}"])
    two = memory_plan(cfg, world_size=2, gpu_gb=80)
    assert two.fits and two.peak < 0.85 * 80 * GIB, two.table()  # 10% headroom and 5% to spare
    assert not memory_plan(cfg, world_size=1, gpu_gb=80).fits


def test_one_process_samples_in_float32_and_the_plan_says_so():
    cfg = load_config(["experiment=countdown_grpo_qwen3b"])
    one, two = memory_plan(cfg, 1, 80), memory_plan(cfg, 2, 80)
    name = "sampling: prompt pass (full KV cache, prompt logits)"
    assert one.components[name] == 2 * two.components[name]  # float32 cache and logits against bf16, same batch
    assert one.peak_phase == two.peak_phase == "generation"
    assert "samples from the model it is given: in one process the float32 master model" in one.verdict()
    assert "float32 master model" not in two.verdict()


def test_advice_names_only_knobs_that_lower_the_peak():
    grpo = memory_plan(load_config(["experiment=countdown_grpo_qwen3b"]), 2, 80)  # peak: sampling
    assert grpo.peak_phase == "generation"
    assert any(a.startswith("rollout.batch_size=128 -> ") for a in grpo.advice)
    assert not any(a.startswith(("trainer.micro_batch_tokens", "model.gradient_checkpointing")) for a in grpo.advice)
    server = memory_plan(load_config(["experiment=countdown_grpo_qwen3b_server"]), 1, 80)  # peak: the update
    assert server.peak_phase == "update"
    assert any(a.startswith("trainer.micro_batch_tokens=8192 -> ") for a in server.advice)
    assert not any(a.startswith(("rollout.", "torchrun")) for a in server.advice)  # no sampling here; one process
    for plan in (grpo, server):
        for advice in plan.advice:
            assert float(advice.rsplit("-> ", 1)[1].removesuffix(" GiB")) < plan.peak / GIB
    off = memory_plan(load_config(["experiment=countdown_grpo_qwen3b", "model.gradient_checkpointing=false"]), 2, 80)
    assert any(a.startswith("model.gradient_checkpointing=true -> ") for a in off.advice)


def test_a_layout_the_trainer_refuses_is_refused_by_the_plan(tmp_path):
    from tinyrl.config import ConfigError

    cfg = load_config(["experiment=countdown_grpo_qwen3b_server"])
    with pytest.raises(ConfigError, match=r"^rollout.layout: a vLLM server takes the weights of one training process"):
        memory_plan(cfg, world_size=2)
    done = subprocess.run(
        [sys.executable, "-c", "from tinyrl.cli import plan_main; plan_main()", "experiment=countdown_grpo_qwen3b_server",
         "--world-size", "2"], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("tinyrl-plan: rollout.layout: a vLLM server") and done.stderr.count("\n") == 1


# Every memory figure of the README and the presets' comments is the plan's: the README's table is
# `presets_table(...)` verbatim, and each "`tinyrl-plan experiment=X --world-size N [--gpu-gb G]`: peak P GiB in
# PHASE" is what that command prints.
REPO = Path(__file__).resolve().parents[1]
PLAN_CLAIM = re.compile(r"`tinyrl-plan experiment=(\w+) --world-size (\d+)(?: --gpu-gb (\d+))?`: peak ([\d.]+) GiB "
                        r"in (generation|no-gradient passes|update|optimizer step)")


def _claims(text: str) -> list[tuple]:
    return PLAN_CLAIM.findall(text)


def _check_claim(experiment, world_size, gpu_gb, peak, phase):
    plan = memory_plan(load_config([f"experiment={experiment}"]), int(world_size), float(gpu_gb or 80))
    assert (f"{plan.peak / GIB:.1f}", plan.peak_phase) == (peak, phase), (experiment, world_size, gpu_gb)


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "conf" / "experiment").glob("*qwen3b*.yaml")))
def test_the_presets_memory_comments_are_the_plans(preset):
    comments = "\n".join(line for line in (REPO / "conf" / "experiment" / preset).read_text().splitlines()
                         if line.lstrip().startswith("#"))
    claims = _claims(comments)
    assert claims, f"{preset} states no plan figure"
    for claim in claims:
        _check_claim(*claim)
    assert len(re.findall(r"\d GiB", comments)) == len(claims)  # no memory figure outside a plan claim
    assert set(re.findall(r"(\d+) ?GB", comments)) <= {"80", "141"}  # the GPUs' own sizes only


def test_the_readmes_memory_figures_are_the_plans():
    from tinyrl.plan import presets_table

    readme = (REPO / "README.md").read_text()
    assert presets_table(["countdown_grpo_qwen3b", "countdown_ppo_qwen3b", "countdown_ppo_qwen3b_colocated"], 2) in readme
    assert presets_table(["countdown_grpo_qwen3b", "countdown_grpo_qwen3b_server"], 1) in readme
    assert presets_table(["countdown_grpo_qwen3b", "countdown_grpo_qwen3b_lora"], 1) in readme
    claims = _claims(readme)
    assert len(claims) >= 3
    for claim in claims:
        _check_claim(*claim)


def test_tinyrl_plan_prints_the_table_and_the_verdict():
    done = subprocess.run(
        [sys.executable, "-c", "from tinyrl.cli import plan_main; plan_main()", "experiment=countdown_ppo_qwen3b",
         "--world-size", "2", "--gpu-gb", "80"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| critic AdamW moments (float32) | 11.50 |" in done.stdout
    assert "fits: peak 61.1 GiB in generation" in done.stdout and "lower the peak with: rollout.batch_size=64" in done.stdout


def test_a_model_the_plan_cannot_size_is_named():
    cfg = load_config(["experiment=countdown_grpo_qwen3b", "model.path=someone/unknown-model"])
    with pytest.raises(ValueError, match="model.path: no config.json at 'someone/unknown-model'"):
        memory_plan(cfg, world_size=2)
