"""Time and peak memory of tinyrl's chunked log-probs / entropy against the naive log_softmax version.

    python benchmarks/bench_logprobs.py                              # 8 x 1024 x 151,936 bf16, forward only
    python benchmarks/bench_logprobs.py --backward --seq 256         # forward + backward, smaller
    python benchmarks/bench_logprobs.py --impls chunked --chunk-sizes 256 1024 4096

Each measurement runs in a fresh subprocess so that the process's peak resident set size (`ru_maxrss`)
belongs to that measurement alone. Peak memory is reported as the peak RSS above the RSS measured just
after the inputs were allocated (the bf16 logits themselves are not counted). tracemalloc cannot see torch's
allocations; RSS can, because the CPU allocator hands large tensors back to the OS when freed.

Arithmetic for 8 x 1024 x 151,936 (N = 8,192 tokens, V = 151,936):
  bf16 logits N*V*2 = 2.49 GB (the input, not counted)
  naive forward: logits.float() N*V*4 = 4.98 GB, then log_softmax output 4.98 GB -> ~10 GB over the input
  chunked log-probs: one reused float32 buffer c*V*4 (c=256, the default: 0.16 GB); entropy: two (0.31 GB);
  the backward pass adds the gradient of the logits in their own dtype (2.49 GB), nothing in float32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GB = 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _make_logits(batch: int, seq: int, vocab: int, dtype, seed: int):
    """Random logits filled a slice at a time, so no temporary larger than one slice exists."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(batch, seq, vocab, dtype=dtype)
    for b in range(batch):
        for start in range(0, seq, 16):
            block = torch.randn(min(16, seq - start), vocab, generator=gen).mul_(2.0)
            logits[b, start : start + 16] = block
            del block
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return logits, labels


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _expected_bytes(impl: str, fn: str, backward: bool, args: argparse.Namespace) -> int:
    """Rough upper bound of what one measurement needs: inputs plus the float32 tensors it creates."""
    item = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    tokens = args.batch * args.seq
    inputs = tokens * args.vocab * item
    full32 = tokens * args.vocab * 4
    if impl == "chunked":
        extra = 2 * min(args.chunk_size, tokens) * args.vocab * 4 + (inputs if backward else 0)
    else:
        extra = (2 if fn == "logprobs" else 3) * full32 + (2 * full32 + inputs if backward else 0)
    return inputs + extra


def worker(args: argparse.Namespace) -> dict:
    import torch

    from tinyrl.algorithms import entropy_from_logits, logprobs_from_logits

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    logits, labels = _make_logits(args.batch, args.seq, args.vocab, dtype, args.seed)

    def naive_logprobs(x):
        return torch.log_softmax(x.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    def naive_entropy(x):
        logp = torch.log_softmax(x.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    fns = {
        ("chunked", "logprobs"): lambda x: logprobs_from_logits(x, labels, chunk_size=args.chunk_size),
        ("chunked", "entropy"): lambda x: entropy_from_logits(x, chunk_size=args.chunk_size),
        ("naive", "logprobs"): naive_logprobs,
        ("naive", "entropy"): naive_entropy,
    }
    fn = fns[(args.impl, args.fn)]
    if args.backward:
        logits.requires_grad_(True)
    rss_inputs = _rss_bytes()
    peak_before = _peak_rss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        if args.backward:
            out = fn(logits)
            out.sum().backward()
            logits.grad = None
        else:
            with torch.no_grad():
                out = fn(logits)
        times.append(time.perf_counter() - start)
        del out
    return {
        "impl": args.impl,
        "fn": args.fn,
        "pass": "fwd+bwd" if args.backward else "fwd",
        "chunk_size": args.chunk_size if args.impl == "chunked" else None,
        "best_s": min(times),
        "mean_s": sum(times) / len(times),
        "peak_over_inputs_gb": max(0, _peak_rss_bytes() - rss_inputs) / GB,
        "inputs_gb": rss_inputs / GB,
        "peak_before_call_exceeded_inputs_gb": max(0, peak_before - rss_inputs) / GB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--impls", nargs="+", choices=["chunked", "naive"], default=["chunked", "naive"])
    parser.add_argument("--fns", nargs="+", choices=["logprobs", "entropy"], default=["logprobs", "entropy"])
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--fn", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    shape = f"{args.batch} x {args.seq} x {args.vocab:,} {args.dtype}"
    print(f"# {shape}, {'forward + backward' if args.backward else 'forward (no grad)'}, "
          f"{args.threads} threads, best of {args.repeats}")
    print("| impl | fn | pass | chunk | best s | mean s | peak over inputs GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for impl in args.impls:
        for fn in args.fns:
            for chunk in args.chunk_sizes if impl == "chunked" else [0]:
                args.chunk_size = chunk
                need, free = _expected_bytes(impl, fn, args.backward, args), _available_bytes()
                if need + 2 * 1024**3 > free:
                    print(f"| {impl} | {fn} | skipped: needs ~{need / GB:.1f} GB, {free / GB:.1f} GB available |||||")
                    continue
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--fn", fn, "--chunk-size", str(chunk),
                       "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
                       "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads),
                       "--seed", str(args.seed)] + (["--backward"] if args.backward else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"| {impl} | {fn} | failed: {done.stderr.strip().splitlines()[-1:]} |||||")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                chunk_text = r["chunk_size"] if r["chunk_size"] else "-"
                print(f"| {impl} | {fn} | {r['pass']} | {chunk_text} | {r['best_s']:.2f} | {r['mean_s']:.2f} | "
                      f"{r['peak_over_inputs_gb']:.2f} |", flush=True)
                if r["peak_before_call_exceeded_inputs_gb"] > 0.05:
                    print(f"  (warning: input creation peaked {r['peak_before_call_exceeded_inputs_gb']:.2f} GB "
                          "above the inputs; the peak figure above may be understated)")


if __name__ == "__main__":
    main()
