"""Sampling throughput of the vLLM engine against the transformers engine, same model, prompts and run.

For each model shape, each engine runs in its own subprocess (vLLM in-process changes the thread settings of the
process that hosts it) on the same randomly initialised Qwen2 checkpoint and the same Countdown prompts, `n`
completions per prompt at temperature 1, up to `--new-tokens` new tokens each (random weights rarely end early;
the new tokens actually produced are counted). Reported per engine: seconds to start the engine (for vLLM: the
import, writing the weights it starts from, `vllm.LLM`), best-of-`--repeats` generation seconds, new tokens per
second with the start excluded (best call) and included (start + first call), and the seconds to push the
policy's weights into the engine (`load_weights`; the transformers engine samples from the policy itself: 0).

Shapes: `tiny` (the CPU default's model: hidden 128, 2 layers), `12m` (hidden 512, 4 layers, 12.4M parameters),
`qwen2.5-3b` (Qwen2.5-3B's shape, 3.09B parameters, vocabulary 151,936; GPU only).

CPU (this machine):  .venv-vllm/bin/python benchmarks/bench_rollout.py --shapes tiny 12m
GPU (one command):   python benchmarks/bench_rollout.py --shapes qwen2.5-3b --device cuda --dtype bfloat16 \\
                         --batches 64 256 --new-tokens 256 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUP = 8
SHAPES = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512),
    "12m": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1536),
    # Qwen2.5-3B: tied embeddings, vocabulary 151,936 (the prompts' tokenizer covers the first few hundred ids)
    "qwen2.5-3b": dict(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
                       vocab_size=151936, tie_word_embeddings=True),
}


def _task_texts_and_prompts(count: int):
    from tinyrl.task import get_task

    task = get_task("countdown", max_numbers=3, max_number=20, max_target=50, prompt_style="compact")
    rows = task.dataset("train", 2000, 0)
    return [task.prompt(r) + (task.demonstration(r) or "") for r in rows], [task.prompt(r) for r in rows[:count]]


def build_model(shape: str, out_dir: Path, dtype: str) -> None:
    """Save a randomly initialised model of `shape` (and its tokenizer) to `out_dir`."""
    import torch

    from tinyrl.models import build_tiny_model, train_tokenizer

    texts, _ = _task_texts_and_prompts(1)
    spec = dict(SHAPES[shape])
    if "vocab_size" not in spec:
        build_tiny_model(out_dir, texts, vocab_size=384, max_position_embeddings=2048, seed=0, **spec)
        return
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size=384)
    eos = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=spec["tie_word_embeddings"], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        torch_dtype=dtype,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def worker(args) -> dict:
    """One engine on one model: start, generate `--repeats` times, sync weights; print a JSON line."""
    started = time.perf_counter()
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from tinyrl.models import load_policy
    from tinyrl.rollout import SamplingConfig, make_engine, policy_named_tensors

    model, tokenizer = load_policy(args.model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    model.eval()
    _, texts = _task_texts_and_prompts(args.batch // GROUP)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    loaded = time.perf_counter()
    if args.engine == "hf":
        engine = make_engine("hf", model, tokenizer, batch_size=args.batch)
    else:
        options = dict(dtype=args.dtype, enforce_eager=args.device == "cpu", max_model_len=1024,
                       gpu_memory_utilization=args.gpu_memory_utilization)
        if args.device == "cpu":
            options["kv_cache_memory_bytes"] = 256 << 20
        engine = make_engine("vllm", model, tokenizer, **options)
    start_s = time.perf_counter() - loaded
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, n=GROUP, temperature=1.0, seed=0)
    times, tokens = [], 0
    for _ in range(args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        completions = engine.generate(prompts, sampling)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        tokens = sum(len(c.token_ids) for c in completions)
    sync = []
    if not getattr(engine, "shares_policy_weights", False):
        for _ in range(3):
            t = time.perf_counter()
            engine.load_weights(policy_named_tensors(model))
            if args.device == "cuda":
                torch.cuda.synchronize()
            sync.append(time.perf_counter() - t)
    if hasattr(engine, "close"):
        engine.close()
    return {
        "engine": args.engine, "start_s": start_s, "first_s": times[0], "best_s": min(times), "new_tokens": tokens,
        "tokens_per_s": tokens / min(times), "tokens_per_s_with_start": tokens / (start_s + times[0]),
        "sync_s": sorted(sync)[len(sync) // 2] if sync else 0.0, "process_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "12m"], choices=sorted(SHAPES))
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--batches", nargs="+", type=int, default=[512], help="completions per call (n=8 each)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, dtype {args.dtype}, threads {args.threads}, load average at start "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print("| shape | completions | engine | start s | best generate s | new tokens | tokens/s | tokens/s incl. start "
          "| weight sync s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            model_dir = Path(tmp) / shape
            build_model(shape, model_dir, args.dtype)
            for batch in args.batches:
                for engine in args.engines:
                    command = [sys.executable, __file__, "--worker", "--model-dir", str(model_dir), "--engine", engine,
                               "--batch", str(batch), "--new-tokens", str(args.new_tokens),
                               "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
                               "--dtype", args.dtype, "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
                    out = subprocess.run(command, capture_output=True, text=True, env=env)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        print(f"| {shape} | {batch} | {engine} | failed: {out.stderr.strip().splitlines()[-1:]} |")
                        continue
                    r = json.loads(line[len("RESULT "):])
                    print(f"| {shape} | {batch} | {engine} | {r['start_s']:.1f} | {r['best_s']:.2f} | "
                          f"{r['new_tokens']:,} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_with_start']:,.0f} | "
                          f"{r['sync_s']:.3f} |", flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
