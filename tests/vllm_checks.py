"""Shared checks of the vLLM engine tests (imported by test_rollout_vllm*.py, which skip without vLLM)."""

from __future__ import annotations

import numpy as np
import torch

from tinyrl.rollout import SamplingConfig, make_engine, policy_named_tensors
from tinyrl.rollout.vllm import VLLMEngine

from conftest import TINY_TEXTS

ENGINE_OPTIONS = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=1024)


def start_engine(model, tokenizer, **options):
    return VLLMEngine(model, tokenizer, **{**ENGINE_OPTIONS, **options})


def prompts_of(tokenizer):
    texts = ["User: Using the numbers [3, 4, 5], make 27.", "Assistant: <think>", "12+5=17"]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def long_prompt(tokenizer, engine, blocks=3):
    """A prompt spanning several KV-cache blocks, so a stale prefix cache would serve old keys and values."""
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    text = " ".join(TINY_TEXTS[:40])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: blocks * block + 5]
    assert len(ids) > blocks * block
    return ids


def teacher_forced(model, prompt, tokens, temperature=1.0):
    """Log-probs of `tokens` after `prompt` under the transformers model (full distribution at `temperature`)."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens)])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, -1)
    return [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(tokens)]


def assert_greedy_matches(model, tokenizer, engine, prompts, max_new_tokens=12):
    hf = make_engine("hf", model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens, temperature=0.0))
    ours = engine.generate(prompts, SamplingConfig(max_new_tokens, temperature=0.0))
    assert [c.token_ids for c in ours] == [c.token_ids for c in hf]
    assert [c.finish_reason for c in ours] == [c.finish_reason for c in hf]
    assert [c.text for c in ours] == [c.text for c in hf]
    for a, b in zip(ours, hf):
        assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() < 1e-3
    return ours


def assert_engine_follows_weight_syncs(model, tokenizer, engine, prompts):
    """Greedy output equals transformers' before a sync, after perturbing every weight and syncing (and differs
    from before), and again after syncing the original weights back (and equals before)."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = assert_greedy_matches(model, tokenizer, engine, prompts)  # also fills the prefix cache
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
        engine.load_weights(policy_named_tensors(model))
        after = assert_greedy_matches(model, tokenizer, engine, prompts)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
    finally:
        model.load_state_dict(original)
        engine.load_weights(policy_named_tensors(model))
    back = assert_greedy_matches(model, tokenizer, engine, prompts)
    assert [c.token_ids for c in back] == [c.token_ids for c in before]
