"""Rollout engines: generate completions (token ids, text, sampler log-probs) for batches of prompts.

Every engine implements `RolloutEngine`: `generate(prompt_token_ids, sampling)`, `update_weights(model)` and
`load_weights(named_tensors)`. `hf.HFEngine` runs anywhere transformers runs (CPU, tests) and samples from the
training model itself; `vllm.VLLMEngine` runs vLLM inside the training process (colocated layout) and
`vllm_server.VLLMServerEngine` generates on a separate vLLM server (server layout).
"""

from tinyrl.rollout.base import Completion, RolloutEngine, SamplingConfig, policy_named_tensors

__all__ = ["Completion", "RolloutEngine", "SamplingConfig", "engine_options", "make_engine", "policy_named_tensors"]


def make_engine(kind: str, model, tokenizer, **options) -> RolloutEngine:
    """Build the engine named `kind` ("hf" or "vllm"; vllm with `layout="colocated"` or `"server"`)."""
    if kind == "hf":
        from tinyrl.rollout.hf import HFEngine

        return HFEngine(model, tokenizer, **options)
    if kind == "vllm":
        if options.pop("layout", "colocated") == "server":
            from tinyrl.rollout.vllm_server import VLLMServerEngine

            return VLLMServerEngine(model, tokenizer, **options)
        from tinyrl.rollout.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, **options)
    raise ValueError(f"rollout.engine: unknown engine {kind!r}; choose 'hf' or 'vllm'")


def engine_options(rollout, *, dtype: str, seed: int, device: str = "cpu", per_rank: bool = False) -> dict:
    """`make_engine` options from a `RolloutConfig`; `dtype` and `device` are the trainer's (`dtype` is used when
    `rollout.dtype` is auto; `device` is where a server engine's NCCL weight broadcast starts from). `per_rank`:
    the trainer runs under torchrun, and a colocated vLLM engine joins it as one engine per rank.
    """
    if rollout.engine == "hf":
        return {"batch_size": rollout.batch_size}
    options = dict(
        dtype=dtype if rollout.dtype == "auto" else rollout.dtype,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        tensor_parallel_size=rollout.tensor_parallel_size,
        max_model_len=rollout.max_model_len or rollout.max_prompt_tokens + rollout.max_response_tokens,
        enable_prefix_caching=rollout.enable_prefix_caching,
        enforce_eager=rollout.enforce_eager,
        kv_cache_memory_bytes=rollout.kv_cache_memory_bytes,
    )
    if rollout.layout == "server":
        return dict(layout="server", server_url=rollout.server_url, weight_sync=rollout.weight_sync,
                    server_devices=rollout.server_devices, timeout_s=rollout.timeout_s, device=device, **options)
    if per_rank:
        options["distributed_executor_backend"] = "external_launcher"
    return dict(layout="colocated", seed=seed, sleep_level=rollout.sleep_level, **options)
