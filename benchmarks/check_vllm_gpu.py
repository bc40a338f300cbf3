"""The vLLM paths only a CUDA machine can run, checked against the transformers model, with timings.

1. colocated sleep/wake: `VLLMEngine(sleep_level=2)` generates, sleeps (the GPU memory it frees is measured),
   then `load_weights` of perturbed weights wakes it; greedy tokens and log-probs must equal transformers'.
2. server + NCCL: a vLLM server on GPU 0 (started by `VLLMServerEngine`), the trainer's weights on the last GPU,
   pushed over NCCL through TRL's client; greedy tokens must equal transformers' after a perturbation.
3. tensor parallelism (2+ GPUs): `VLLMEngine(tensor_parallel_size=2)` greedy equals transformers', then again after
   a weight load.
Each check prints PASS or FAIL and its seconds; the exit status is the number of failures. Needs vllm 0.32 and
trl 1.16 (pip install "tinyrl[vllm]").

Usage: python benchmarks/check_vllm_gpu.py [--checks sleep nccl tp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback
from pathlib import Path

TEXTS = ["User: Using the numbers [3, 4, 5], make 27.", "12+5=17", "Assistant: <think>", "7*3=21"]


def _model(tmp: Path, device: str):
    import torch

    from tinyrl.models import build_tiny_model, load_policy

    path = build_tiny_model(tmp / "model", TEXTS * 50, vocab_size=320, hidden_size=256, num_heads=4, num_kv_heads=2,
                            intermediate_size=512, num_layers=2, seed=0)
    model, tokenizer = load_policy(path, dtype=torch.float32, device=device)
    return path, model, tokenizer


def _perturb(model, seed: int) -> None:
    import torch

    with torch.no_grad():
        generator = torch.Generator(device=model.device).manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, device=p.device) * 0.3)


def _greedy_equal(model, tokenizer, engine) -> tuple[bool, float]:
    from tinyrl.rollout import SamplingConfig, make_engine

    prompts = tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    ours = engine.generate(prompts, SamplingConfig(16, temperature=0.0))
    theirs = make_engine("hf", model, tokenizer).generate(prompts, SamplingConfig(16, temperature=0.0))
    worst = max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a.logprobs, b.logprobs))
    return [c.token_ids for c in ours] == [c.token_ids for c in theirs] and worst < 1e-3, worst


def check_sleep(tmp: Path) -> str:
    import torch

    from tinyrl.rollout import policy_named_tensors
    from tinyrl.rollout.vllm import VLLMEngine

    _, model, tokenizer = _model(tmp, "cuda:0")
    engine = VLLMEngine(model, tokenizer, dtype="float32", gpu_memory_utilization=0.3, sleep_level=2)
    ok_before, _ = _greedy_equal(model, tokenizer, engine)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    freed = (torch.cuda.mem_get_info()[0] - free_awake) / 2**30
    _perturb(model, 1)
    t = time.perf_counter()
    engine.load_weights(policy_named_tensors(model))
    wake_s = time.perf_counter() - t
    ok_after, worst = _greedy_equal(model, tokenizer, engine)
    engine.close()
    ok = ok_before and ok_after and freed > 0.5
    return f"{'PASS' if ok else 'FAIL'} sleep: freed {freed:.1f} GiB asleep, wake+load {wake_s:.2f} s, max |dlogp| {worst:.1e}"


def check_nccl(tmp: Path) -> str:
    import torch

    from tinyrl.rollout import policy_named_tensors
    from tinyrl.rollout.vllm_server import VLLMServerEngine

    trainer_gpu = torch.cuda.device_count() - 1
    _, model, tokenizer = _model(tmp, f"cuda:{trainer_gpu}")
    utilization = 0.9 if trainer_gpu > 0 else 0.3  # one GPU: server and trainer share it
    engine = VLLMServerEngine(model, tokenizer, weight_sync="nccl", server_devices="0", device=f"cuda:{trainer_gpu}",
                              dtype="float32", gpu_memory_utilization=utilization)
    try:
        ok_before, _ = _greedy_equal(model, tokenizer, engine)
        _perturb(model, 2)
        t = time.perf_counter()
        engine.load_weights(policy_named_tensors(model))
        sync_s = time.perf_counter() - t
        ok_after, worst = _greedy_equal(model, tokenizer, engine)
    finally:
        engine.close()
    ok = ok_before and ok_after
    return f"{'PASS' if ok else 'FAIL'} nccl: server GPU 0, trainer GPU {trainer_gpu}, sync {sync_s:.2f} s, max |dlogp| {worst:.1e}"


def check_tp(tmp: Path) -> str:
    import torch

    from tinyrl.rollout import policy_named_tensors
    from tinyrl.rollout.vllm import VLLMEngine

    if torch.cuda.device_count() < 2:
        return "SKIP tp: needs 2 GPUs"
    _, model, tokenizer = _model(tmp, "cuda:0")
    engine = VLLMEngine(model, tokenizer, dtype="float32", gpu_memory_utilization=0.3, tensor_parallel_size=2)
    ok_before, _ = _greedy_equal(model, tokenizer, engine)
    _perturb(model, 3)
    engine.load_weights(policy_named_tensors(model))
    ok_after, worst = _greedy_equal(model, tokenizer, engine)
    engine.close()
    return f"{'PASS' if ok_before and ok_after else 'FAIL'} tp=2: max |dlogp| {worst:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", nargs="+", default=["sleep", "nccl", "tp"], choices=["sleep", "nccl", "tp"])
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    failures = 0
    for name in args.checks:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                line = {"sleep": check_sleep, "nccl": check_nccl, "tp": check_tp}[name](Path(tmp))
            except Exception:
                line = f"FAIL {name}: {traceback.format_exc(limit=3)}"
        failures += line.startswith("FAIL")
        print(f"{line} ({time.perf_counter() - started:.0f} s)", flush=True)
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
