"""Rollout engines: generate completions (token ids, text, sampler log-probs) for batches of prompts.

Every engine implements `RolloutEngine`: `generate(prompt_token_ids, sampling)` and `update_weights(model)`.
`hf.HFEngine` runs anywhere transformers runs (CPU, tests); `vllm.VLLMEngine` is the fast path on GPUs.
"""

from tinyrl.rollout.base import Completion, RolloutEngine, SamplingConfig

__all__ = ["Completion", "RolloutEngine", "SamplingConfig", "make_engine"]


def make_engine(kind: str, model, tokenizer, **options) -> RolloutEngine:
    """Build the engine named `kind` ("hf" or "vllm") around the policy `model`."""
    if kind == "hf":
        from tinyrl.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **options)
    if kind == "vllm":
        from tinyrl.rollout.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, **options)
    raise ValueError(f"rollout.engine: unknown engine {kind!r}; choose 'hf' or 'vllm'")
