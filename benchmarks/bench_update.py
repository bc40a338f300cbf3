"""Update-phase tokens/s and MFU on a ragged RL batch: padded micro-batches against packed ones, same run.

Each mode runs the trainer's own update (`RLTrainer._optimizer_step`: GRPO loss over the whole mini-batch, its
forward and backward passes micro-batch by micro-batch within `--micro-batch-tokens`, gradient clipping and one
AdamW step) on the same randomly initialised Qwen2-shaped model and the same batch. Modes alternate within every
repeat, so a drift in the machine's speed reaches all of them alike; the median over repeats is reported.

    python benchmarks/bench_update.py                                  # tiny default model, CPU
    python benchmarks/bench_update.py --shape cpu-large                # a larger CPU shape, longer responses
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_update.py  # 2 ranks (FSDP2), whole groups each
    python benchmarks/bench_update.py --shape qwen2.5-3b --device cuda --gradient-checkpointing \\
        --modes padded:sdpa packed:sdpa packed:flex_attention packed:flash_attention_2

A mode is `padded:<attention>`, `shared:<attention>` (padded, each group's prompt run once) or `packed:<attention>`
(attention: sdpa, eager, flex_attention, flash_attention_2; the model switches kernels in place, so all modes share
one set of weights). The ragged batch has groups of 8 completions of one prompt, draws prompt lengths
uniformly in `--prompt-lengths`, response lengths uniformly in `--response-lengths`, and sets a share
`--clipped` of the responses to the maximum length (completions cut at `max_response_tokens`), as RL batches are.

Under torchrun every rank updates on its own whole groups of the batch (FSDP2-sharded model, loss normalised over
the whole mini-batch, as the trainer does); a mode's time is the slowest rank's. Tokens/s counts real tokens
(prompt + response of every row of every rank), never padding. MFU = 6 x parameters x tokens/s over the peak:
the best matmul throughput measured before every repeat (float32 on CPU, bf16 on GPU; on a shared machine it
moves with the load), summed over ranks, unless `--peak-tflops` gives one (e.g. 989 for an H100 SXM's dense
bf16). Gradient checkpointing's recomputation is not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import transformers

SHAPES = {
    # tinyrl's default tiny model (config.TinyModelConfig) and the default run's batch: 64 prompts x 8 completions
    "tiny": dict(
        model=dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=512, tie_word_embeddings=False),
        rows=512, prompt_lengths=(40, 64), response_lengths=(8, 96), clipped=0.15, micro_batch_tokens=16384,
    ),
    # a ~16M-parameter model with RL-length responses, still CPU-sized
    "cpu-large": dict(
        model=dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=1408, tie_word_embeddings=True),
        rows=64, prompt_lengths=(64, 128), response_lengths=(32, 512), clipped=0.15, micro_batch_tokens=8192,
    ),
    # Qwen2.5-3B's shape (3.09 B parameters), random weights; batch as ENVIRONMENT.md's H100 measurement:
    # 32 sequences of 150..1150 tokens
    "qwen2.5-3b": dict(
        model=dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                   num_key_value_heads=2, intermediate_size=11008, tie_word_embeddings=True, rope_theta=1e6),
        rows=32, prompt_lengths=(100, 150), response_lengths=(50, 1000), clipped=0.0, micro_batch_tokens=8192,
    ),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", default=["padded:sdpa", "shared:sdpa", "packed:sdpa"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--rows", type=int, help="completions in the mini-batch (default: the shape's)")
    p.add_argument("--prompt-lengths", type=int, nargs=2)
    p.add_argument("--response-lengths", type=int, nargs=2)
    p.add_argument("--clipped", type=float, help="share of responses at the maximum length")
    p.add_argument("--micro-batch-tokens", type=int)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s in TFLOP/s (default: measured matmul peak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args()


GROUP = 8  # completions per prompt
# padded rows, each prompt run once per group (the trainer's default on one process), or packed rows
LAYOUTS = ("padded", "shared", "packed")


def unavailable(mode: str, device: torch.device) -> str | None:
    """Why a mode cannot run here, or None."""
    import importlib.util

    layout, _, attention = mode.partition(":")
    if layout not in LAYOUTS or attention not in ("sdpa", "eager", "flex_attention", "flash_attention_2"):
        raise SystemExit(f"--modes: {mode!r} is not <{'|'.join(LAYOUTS)}>:<attention>")
    if attention == "flash_attention_2" and (device.type != "cuda" or importlib.util.find_spec("flash_attn") is None):
        return "needs a CUDA device and the flash-attn package"
    if attention == "flex_attention" and device.type != "cuda":
        return "flex_attention has no backward pass on the CPU"
    return None


def _distinct_prompt_tokens(mb) -> int:
    from tinyrl.rollout.kv_decode import distinct_rows

    first, _ = distinct_rows(mb.input_ids[:, : mb.prompt_width], mb.attention_mask[:, : mb.prompt_width])
    return first.shape[0] * mb.prompt_width


def matmul_peak_flops(device: torch.device) -> float:
    """Best FLOP/s of a square matmul in the compute dtype the trainer uses there (float32 CPU, bf16 GPU)."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5 if device.type == "cpu" else 20):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ragged_batch(rows: int, prompt_lengths, response_lengths, clipped: float, vocab: int, seed: int):
    from tinyrl.batch import build_batch

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(rows):
        if i % GROUP == 0:  # the completions of a group continue one prompt
            p = int(torch.randint(prompt_lengths[0], prompt_lengths[1] + 1, (), generator=g))
            prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        r = int(torch.randint(response_lengths[0], response_lengths[1] + 1, (), generator=g))
        if torch.rand((), generator=g) < clipped:
            r = response_lengths[1]
        prompts.append(prompt)
        responses.append(torch.randint(3, vocab, (r,), generator=g).tolist())
    batch = build_batch(prompts, responses, [0.0] * rows, [i // GROUP for i in range(rows)], pad_id=0)
    batch.advantages = torch.randn(batch.response_mask.shape, generator=g) * batch.response_mask
    return batch


def build_trainer(shape: dict, world, micro_batch_tokens: int, checkpointing: bool, run_dir: str):
    """The trainer over a random-weight model of `shape` (sharded by FSDP2 under torchrun); and its parameters."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tinyrl.compose import load_config
    from tinyrl.models import count_parameters, train_tokenizer
    from tinyrl.task import get_task
    from tinyrl.trainer import RLTrainer

    torch.manual_seed(0)
    config = Qwen2Config(**shape["model"], max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(world.load_device):
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = count_parameters(policy)
    if checkpointing:
        policy.gradient_checkpointing_enable()
    task = get_task("countdown")
    rows = task.dataset("train", 8, 0)
    tokenizer = train_tokenizer([task.prompt(r) for r in task.dataset("train", 200, 0)], vocab_size=320)
    cfg = load_config([
        f"device={world.device.type}", f"run_dir={run_dir}", "algorithm=grpo", "algorithm.kl_coef=0",
        "sft.enabled=false", f"trainer.micro_batch_tokens={micro_batch_tokens}", "trainer.lr=1e-6",
        "task.reward_workers=0", "rollout.max_prompt_tokens=512", "logging.progress=false", "logging.plot=false",
    ])
    return RLTrainer(cfg, run_dir, policy, tokenizer, task, rows, rows, world=world), params


def main():
    from tinyrl.distributed import init_world
    from tinyrl.packing import pack_layout, packing_for, plan_micro_batches

    args = parse_args()
    torch.set_num_threads(args.threads)
    world = init_world(args.device)  # torchrun's ranks when launched by torchrun, else one process
    device = world.device
    shape = SHAPES[args.shape]
    rows = args.rows or shape["rows"]
    prompt_lengths = args.prompt_lengths or shape["prompt_lengths"]
    response_lengths = args.response_lengths or shape["response_lengths"]
    clipped = shape["clipped"] if args.clipped is None else args.clipped
    budget = args.micro_batch_tokens or shape["micro_batch_tokens"]
    say = print if world.is_main else (lambda *a, **k: None)
    skipped = {m: why for m in args.modes if (why := unavailable(m, device))}
    for mode, why in skipped.items():
        say(f"skipping {mode}: {why}")
    modes = [m for m in args.modes if m not in skipped]
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as run_dir:
        trainer, params = build_trainer(shape, world, budget, args.gradient_checkpointing, run_dir)
        policy = trainer.policy
        batch = ragged_batch(rows, prompt_lengths, response_lengths, clipped, shape["model"]["vocab_size"], args.seed)
        # each rank updates on its own whole groups, as the trainer splits a step's prompts
        groups = sorted(set(batch.group_index.tolist()))
        mine = {groups[g] for g in world.share(len(groups))}
        my_rows = [i for i in range(batch.size) if int(batch.group_index[i]) in mine]
        tokens = int(batch.attention_mask.sum())  # over all ranks
        peaks = [] if args.peak_tflops else [matmul_peak_flops(device)]

        def configure(mode: str):
            layout, attention = mode.split(":")
            policy.set_attn_implementation(attention)
            trainer.packed_layout = packing_for([policy]) if layout == "packed" else None
            trainer.share_prompts = layout == "shared"
            micro, packing = plan_micro_batches(batch, my_rows, budget, trainer.packed_layout)
            if layout == "shared":  # each distinct prompt once per micro-batch, then every row's response columns
                fed = sum(_distinct_prompt_tokens(batch.select(m)) + batch.select(m).responses().numel() for m in micro)
            elif packing is None:
                fed = sum(batch.select(m).input_ids.numel() for m in micro)
            else:
                fed = sum(pack_layout(batch.select(m), packing).tokens for m in micro)
            return int(world.sum(len(micro))), int(world.sum(fed))

        shapes, seconds, memory = {}, {m: [] for m in modes}, {}
        for mode in modes:  # warm-up (and flex_attention's compilation), not timed
            shapes[mode] = configure(mode)
            trainer._optimizer_step(batch, my_rows, step=1, on_policy=True)
        for repeat in range(args.repeats):
            if not args.peak_tflops:  # on a shared machine the peak moves with the load: measure it throughout
                peaks.append(matmul_peak_flops(device))
            order = modes if repeat % 2 == 0 else list(reversed(modes))
            for mode in order:
                configure(mode)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                world.barrier("the previous mode")
                _sync(device)
                start = time.perf_counter()
                trainer._optimizer_step(batch, my_rows, step=1, on_policy=True)
                _sync(device)
                seconds[mode].append(world.max(time.perf_counter() - start))  # the slowest rank's time
                if device.type == "cuda":
                    memory[mode] = world.max(torch.cuda.max_memory_allocated(device) / 2**30)
        trainer.close()

    # every rank computes on its own core or GPU: the peak of the whole world is the sum of the ranks' peaks
    peak = args.peak_tflops * 1e12 if args.peak_tflops else world.sum(max(peaks))
    results = []
    for mode in modes:
        median = statistics.median(seconds[mode])
        # each repeat's time over the first mode's in the same repeat: robust to the machine's drift
        paired = statistics.median(t / t0 for t, t0 in zip(seconds[mode], seconds[modes[0]]))
        micro_batches, fed = shapes[mode]
        results.append({
            "mode": mode, "seconds_median": median,
            "seconds_min": min(seconds[mode]), "seconds_max": max(seconds[mode]), "seconds": seconds[mode],
            "time_vs_first_mode": paired, "tokens_per_s": tokens / median,
            "mfu": 6 * params * tokens / median / peak,
            "micro_batches": micro_batches, "fed_tokens": fed, "padding_share": 1 - tokens / fed,
            "peak_gib": memory.get(mode),
        })
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (
            f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__, "transformers": transformers.__version__, "processes": world.size,
        "threads": args.threads, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "shape": args.shape, "parameters": params, "rows": rows, "tokens": tokens,
        "prompt_lengths": list(prompt_lengths), "response_lengths": list(response_lengths), "clipped": clipped,
        "micro_batch_tokens": budget, "gradient_checkpointing": args.gradient_checkpointing,
        "peak_tflops": peak / 1e12, "peak_measured": not args.peak_tflops, "repeats": args.repeats,
    }
    if not world.is_main:
        return
    print(json.dumps(header))
    print(f"| mode | micro-batches | tokens fed (padding share) | seconds (median, min-max) | time / {modes[0]} "
          "(paired median) | tokens/s | MFU |" + (" peak GiB |" if memory else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if memory else ""))
    for r in results:
        print(f"| {r['mode']} | {r['micro_batches']} | {r['fed_tokens']:,} ({r['padding_share']:.0%}) | "
              f"{r['seconds_median']:.3f} ({r['seconds_min']:.3f}-{r['seconds_max']:.3f}) | "
              f"{r['time_vs_first_mode']:.3f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} |"
              + (f" {r['peak_gib']:.1f} |" if memory else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
