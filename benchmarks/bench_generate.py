"""Sampling throughput of tinyrl's transformers engine against `model.generate`, same model, prompts and run.

Both sample 64 Countdown prompts x 8 completions of up to 96 new tokens at temperature 1 from the same randomly
initialised tiny Qwen2 (tinyrl.models defaults), float32 on the CPU, with a KV cache, each until its end token or
96 tokens; both sides then produce about the same number of new tokens (printed), so this compares the decode loops.
tinyrl's engine also returns each token's log-prob and gives every completion its own random stream;
`model.generate` does neither. Reported: best of `--repeats` wall times and new tokens per second.

Usage: .venv/bin/python benchmarks/bench_generate.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

PROMPTS, GROUP, NEW_TOKENS = 64, 8, 96


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tinyrl.models import build_tiny_model, load_policy
    from tinyrl.rollout import SamplingConfig, make_engine
    from tinyrl.task import get_task

    task = get_task("countdown", max_numbers=3, max_number=20, max_target=50, prompt_style="compact")
    rows = task.dataset("train", 2000, 0)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(Path(tmp), [task.prompt(r) + (task.demonstration(r) or "") for r in rows], vocab_size=384)
        model, tokenizer = load_policy(tmp)
    prompts = [tokenizer(task.prompt(r), add_special_tokens=False)["input_ids"] for r in rows[:PROMPTS]]
    engine = make_engine("hf", model, tokenizer, batch_size=PROMPTS * GROUP)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, n=GROUP, temperature=1.0, seed=0)

    def ours() -> int:
        return sum(len(c.token_ids) for c in engine.generate(prompts, sampling))

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = (torch.arange(width)[None, :] >= (width - torch.tensor([len(p) for p in prompts]))[:, None]).long()

    @torch.no_grad()
    def theirs() -> int:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, num_return_sequences=GROUP, max_new_tokens=NEW_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, width:]
        return int((new != tokenizer.pad_token_id).sum())

    print(f"# {PROMPTS} prompts x {GROUP} samples, <= {NEW_TOKENS} new tokens, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| engine | best seconds | new tokens | tokens/s |\n| --- | --- | --- | --- |")
    for name, run in (("tinyrl HFEngine", ours), ("transformers model.generate", theirs)):
        best, tokens = float("inf"), 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            tokens = run()
            best = min(best, time.perf_counter() - start)
        print(f"| {name} | {best:.2f} | {tokens} | {tokens / best:,.0f} |")


if __name__ == "__main__":
    main()
