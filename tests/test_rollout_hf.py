import torch

from tinyrl.models import load_policy
from tinyrl.rollout import SamplingConfig, make_engine


def _engine(tiny_model_dir, batch_size=64):
    model, tokenizer = load_policy(tiny_model_dir)
    return model, tokenizer, make_engine("hf", model, tokenizer, batch_size=batch_size)


def _prompts(tokenizer):
    texts = ["User: Using the numbers [3, 4, 5], make 27.", "Assistant: <think>", "12+5=17"]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_logprobs_match_a_full_forward_pass(tiny_model_dir):
    model, tokenizer, engine = _engine(tiny_model_dir)
    prompts = _prompts(tokenizer)
    sampling = SamplingConfig(max_new_tokens=12, n=3, temperature=0.7, top_k=50, top_p=0.9, seed=1)
    completions = engine.generate(prompts, sampling)
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in completions:
        ids = torch.tensor([prompts[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].float() / 0.7
        # rebuild the processed distribution: top-k 50 then nucleus 0.9
        p = len(prompts[c.prompt_index])
        for t, token in enumerate(c.token_ids):
            row = logits[p - 1 + t]
            kth = torch.topk(row, 50).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, -1)
            sorted_p, order = probs.sort(descending=True)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= 0.9
            row = row.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
            expected = torch.log_softmax(row, -1)[token]
            assert torch.isfinite(expected)
            assert abs(float(expected) - c.logprobs[t]) < 1e-4


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_dir):
    _, tokenizer, engine = _engine(tiny_model_dir, batch_size=64)
    prompts = _prompts(tokenizer)
    sampling = SamplingConfig(max_new_tokens=10, n=4, temperature=1.0, seed=42)
    first = engine.generate(prompts, sampling)
    again = engine.generate(prompts, sampling)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    # the same completion whatever micro-batch it is decoded in
    small = make_engine("hf", engine.model, tokenizer, batch_size=3).generate(prompts, sampling)
    assert [c.token_ids for c in first] == [c.token_ids for c in small]
    other = engine.generate(prompts, SamplingConfig(max_new_tokens=10, n=4, temperature=1.0, seed=43))
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_greedy_matches_transformers_generate(tiny_model_dir):
    model, tokenizer, engine = _engine(tiny_model_dir)
    prompts = _prompts(tokenizer)
    ours = engine.generate(prompts, SamplingConfig(max_new_tokens=8, temperature=0.0))
    for c in ours:
        ids = torch.tensor([prompts[c.prompt_index]])
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
        expected = ref[0, ids.shape[1]:].tolist()
        assert c.token_ids == expected[: len(c.token_ids)]
        assert c.finish_reason == ("stop" if len(c.token_ids) < 8 else "length")


def test_stop_strings_end_generation_and_are_kept(tiny_model_dir):
    model, tokenizer, engine = _engine(tiny_model_dir)
    prompts = _prompts(tokenizer)
    free = engine.generate(prompts, SamplingConfig(max_new_tokens=30, n=4, temperature=1.5, seed=5))
    # pick a piece of text the model actually produced and use it as a stop string
    target = next(c for c in free if len(c.text) > 6)
    stop = target.text[3:6]
    stopped = engine.generate(prompts, SamplingConfig(max_new_tokens=30, n=4, temperature=1.5, seed=5, stop=(stop,)))
    hit = stopped[free.index(target)]
    assert hit.finish_reason == "stop"
    assert hit.text.endswith(stop) or stop in hit.text[-len(stop) - 8 :]
    assert len(hit.token_ids) < len(target.token_ids)
    assert hit.token_ids == target.token_ids[: len(hit.token_ids)]


def test_sampler_draws_from_the_processed_distribution():
    from tinyrl.rollout.hf import HFEngine

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0]).repeat(40000, 1)
    uniforms = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampling = SamplingConfig(max_new_tokens=1, temperature=0.8, top_k=4, seed=0)
    chosen, logprobs = HFEngine._sample(logits, sampling, uniforms)
    kept = logits[0] / 0.8
    kept = kept.masked_fill(kept < torch.topk(kept, 4).values[-1], float("-inf"))
    expected = torch.softmax(kept, -1)
    observed = torch.bincount(chosen, minlength=6).double() / len(chosen)
    assert observed[expected == 0].sum() == 0  # tokens cut by top-k are never drawn
    assert torch.allclose(observed, expected.double(), atol=0.01)
    assert torch.allclose(logprobs, torch.log(expected)[chosen])
    # the extreme draws still land on tokens that have probability
    edge, _ = HFEngine._sample(logits[:2], sampling, torch.tensor([0.0, 1.0 - 1e-16], dtype=torch.float64))
    assert all(expected[t] > 0 for t in edge.tolist())


def test_engine_samples_first_tokens_at_the_model_frequencies(tiny_model_dir):
    model, tokenizer, engine = _engine(tiny_model_dir, batch_size=4096)
    prompt = _prompts(tokenizer)[1]
    completions = engine.generate([prompt], SamplingConfig(max_new_tokens=1, n=4000, temperature=1.0, seed=3))
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    observed = torch.bincount(torch.tensor([c.token_ids[0] for c in completions]), minlength=len(expected)).double()
    observed /= observed.sum()
    assert (observed - expected).abs().max() < 0.03


def _completions_agree(ours, theirs, tolerance=1e-5):
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.finish_reason for c in ours] == [c.finish_reason for c in theirs]
    for a, b in zip(ours, theirs):
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) < tolerance


def test_static_cache_decoder_matches_the_models_own_forward(tiny_model_dir):
    """The preallocated-cache decoder gives the same completions as transformers' forward with its own cache,
    whether finished rows leave the cache at once (compact_below=1) or never (0)."""
    from tinyrl.rollout.hf import HFEngine
    from tinyrl.rollout.kv_decode import StaticKVDecoder

    model, tokenizer = load_policy(tiny_model_dir)
    assert StaticKVDecoder.supports(model)
    prompts = _prompts(tokenizer)  # three lengths: left padding in every batch
    sampling = SamplingConfig(max_new_tokens=24, n=4, temperature=1.3, seed=11, stop=("=",))
    reference = HFEngine(model, tokenizer, fast_decode=False, compact_below=1.0).generate(prompts, sampling)
    assert {c.finish_reason for c in reference} == {"stop", "length"}  # rows finish at different steps
    for compact_below in (1.0, 0.75, 0.0):
        ours = HFEngine(model, tokenizer, compact_below=compact_below).generate(prompts, sampling)
        _completions_agree(ours, reference)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    _completions_agree(HFEngine(model, tokenizer).generate(prompts, greedy),
                       HFEngine(model, tokenizer, fast_decode=False).generate(prompts, greedy))


def test_prefill_runs_each_distinct_prompt_once(tiny_model_dir, monkeypatch):
    """The n completions of a prompt share its prefill: the first forward sees one row per distinct prompt (the
    completions themselves are checked against transformers' own forward above)."""
    from tinyrl.rollout.hf import HFEngine
    from tinyrl.rollout.kv_decode import StaticKVDecoder

    model, tokenizer = load_policy(tiny_model_dir)
    widths = []
    forward = StaticKVDecoder._forward
    monkeypatch.setattr(StaticKVDecoder, "_forward",
                        lambda self, ids, *args: (widths.append(tuple(ids.shape)), forward(self, ids, *args))[1])
    prompts = _prompts(tokenizer)
    HFEngine(model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens=3, n=4, temperature=1.0, seed=0))
    assert widths[0] == (len(prompts), max(map(len, prompts))) and widths[1] == (4 * len(prompts), 1)


def test_static_cache_decoder_covers_llama_and_qwen3_layers(tiny_model_dir):
    """Llama (no attention bias) and Qwen3 (per-head q/k norms) run through the same decoder, exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from tinyrl.rollout.hf import HFEngine
    from tinyrl.rollout.kv_decode import StaticKVDecoder

    _, tokenizer = load_policy(tiny_model_dir)
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    for model in (LlamaForCausalLM(LlamaConfig(**shape)), Qwen3ForCausalLM(Qwen3Config(**shape))):
        model.eval()
        assert StaticKVDecoder.supports(model)
        sampling = SamplingConfig(max_new_tokens=12, n=3, temperature=1.0, seed=2)
        _completions_agree(HFEngine(model, tokenizer).generate(_prompts(tokenizer), sampling),
                           HFEngine(model, tokenizer, fast_decode=False).generate(_prompts(tokenizer), sampling))


def test_generation_raises_no_deprecation_warnings(tiny_model_dir, recwarn):
    """Neither decode path passes arguments that transformers has deprecated (e.g. `past_key_values` in 5.24)."""
    import logging

    from tinyrl.rollout.hf import HFEngine

    model, tokenizer = load_policy(tiny_model_dir)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        for fast in (True, False):
            HFEngine(model, tokenizer, fast_decode=fast).generate(
                _prompts(tokenizer), SamplingConfig(max_new_tokens=4, n=2, temperature=1.0, seed=0)
            )
    finally:
        hf_logger.removeHandler(handler)
    assert not [w for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not [r for r in records if "deprecat" in r.getMessage().lower()]


class _Marker:
    """An environment that writes `words` once, after the first policy token holding one of `triggers`."""

    def __init__(self, words: str, triggers: str):
        self.words, self.triggers, self.calls = words, triggers, []

    def __call__(self, prompt: str, text: str):
        self.calls.append((prompt, text))
        return None if self.words in text else self.words


def test_environment_words_are_written_between_policy_tokens_and_listed(tiny_model_dir):
    """Tokens the environment writes (`SamplingConfig.feedback`) enter the sequence as if sampled: the policy's
    next tokens are conditioned on them (checked against a full forward pass over the finished sequence), their
    positions are listed, their log-probs are 0, and the decode stays exact across cache compaction."""
    from tinyrl.rollout.hf import HFEngine

    model, tokenizer = load_policy(tiny_model_dir)
    prompts = _prompts(tokenizer)
    every_char = "".join(sorted({ch for i in range(len(tokenizer)) for ch in tokenizer.decode([i])}))
    words = "12+5=17"
    written = tokenizer.encode(words, add_special_tokens=False)
    for compact_below in (1.0, 0.0):
        marker = _Marker(words, every_char)
        engine = HFEngine(model, tokenizer, compact_below=compact_below)
        greedy = engine.generate(prompts, SamplingConfig(max_new_tokens=16, temperature=0.0, stop=("=",), feedback=marker))
        for c in greedy:
            assert c.environment_positions == list(range(1, 1 + len(written)))
            assert c.token_ids[1 : 1 + len(written)] == written and words in c.text
            assert all(c.logprobs[t] == 0.0 for t in c.environment_positions)
            ids = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0]
            p = len(prompts[c.prompt_index])
            policy_steps = [t for t in range(len(c.token_ids)) if t not in c.environment_positions]
            assert len(policy_steps) > 1  # the policy wrote after the environment did
            assert all(int(logits[p - 1 + t].argmax()) == c.token_ids[t] for t in policy_steps)
        # the environment is asked with the decoded prompt and the completion so far, once per completion here
        assert {prompt for prompt, _ in marker.calls} == {tokenizer.decode(p, skip_special_tokens=True) for p in prompts}
    plain = HFEngine(model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens=16, temperature=0.0))
    assert all(c.environment_positions == [] for c in plain)


def test_build_batch_keeps_environment_tokens_out_of_the_loss():
    from tinyrl.batch import build_batch

    batch = build_batch([[1, 2], [3]], [[4, 5, 6, 7], [8, 9]], [1.0, 0.0], [0, 0], 0, [[0.0] * 4, [0.0] * 2],
                        environment_positions=[[1, 2], []])
    assert batch.response_mask.tolist() == [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    assert batch.attention_mask[0, batch.prompt_width :].tolist() == [1, 1, 1, 1]  # still attended to
