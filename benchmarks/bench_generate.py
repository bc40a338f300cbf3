"""Sampling throughput of tinyrl's transformers engine against `model.generate`, same model, prompts and run, and
where the engine's time goes.

All sample 64 Countdown prompts x 8 completions of up to 96 new tokens at temperature 1 from the same randomly
initialised tiny Qwen2 (the default run's shape: hidden 128, 2 layers, 384-token vocabulary), float32 on the CPU,
with a KV cache, each until its end token or 96 tokens; all produce about the same number of new tokens (printed).
Rows: the engine's static-cache decoder (`StaticKVDecoder`, its default for Llama-family models; it prefills each
distinct prompt once for its n completions), the same decoder prefilling every row's own copy, the engine over
the model's own forward and transformers' cache (`fast_decode=False`, what any other architecture gets), and
`model.generate`. The engine also returns each token's log-prob and gives every completion its own random stream;
`model.generate` does neither. Reported: best of `--repeats` wall times and new tokens per second; then, from a
torch profile of one engine call, the share of its time in matrix products (the arithmetic) and per decode step.

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
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def _every_row_prefill_engine():
    from tinyrl.rollout.hf import HFEngine
    from tinyrl.rollout.kv_decode import StaticKVDecoder

    class EveryRowPrefill(StaticKVDecoder):
        """The decoder with each row prefilling its own copy of its prompt: the peer of the shared prefill."""

        def prefill(self, input_ids, attention_mask):
            width = input_ids.shape[1]
            self.bias[:, 0, 0, :width].masked_fill_(attention_mask == 0, torch.finfo(torch.float32).min)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            causal = torch.full((width, width), float("-inf")).triu(1)
            return self._forward(input_ids, positions, self.bias[:, :, :, :width] + causal), positions[:, -1] + 1

    class Engine(HFEngine):
        def _decoder(self, rows, max_len):
            return EveryRowPrefill(self.model, rows, max_len)

    return Engine


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
    static = make_engine("hf", model, tokenizer, batch_size=PROMPTS * GROUP)
    every_row = _every_row_prefill_engine()(model, tokenizer, batch_size=PROMPTS * GROUP)
    generic = make_engine("hf", model, tokenizer, batch_size=PROMPTS * GROUP, fast_decode=False)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, n=GROUP, temperature=1.0, seed=0)

    def engine_run(engine):
        return lambda: sum(len(c.token_ids) for c in engine.generate(prompts, sampling))

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = (torch.arange(width)[None, :] >= (width - torch.tensor([len(p) for p in prompts]))[:, None]).long()

    @torch.no_grad()
    def generate() -> int:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, num_return_sequences=GROUP, max_new_tokens=NEW_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, width:]
        return int((new != tokenizer.pad_token_id).sum())

    print(f"# {PROMPTS} prompts x {GROUP} samples, <= {NEW_TOKENS} new tokens, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print("| engine | best seconds | new tokens | tokens/s |\n| --- | --- | --- | --- |")
    runs = {"tinyrl HFEngine, static-cache decoder": engine_run(static),
            "tinyrl HFEngine, static-cache decoder, every row prefilled": engine_run(every_row),
            "tinyrl HFEngine, model forward + transformers cache": engine_run(generic),
            "transformers model.generate": generate}
    best, tokens = {name: float("inf") for name in runs}, {}
    for _ in range(args.repeats):  # round robin, so a drift in the machine's speed reaches every row alike
        for name, run in runs.items():
            start = time.perf_counter()
            tokens[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    for name in runs:
        print(f"| {name} | {best[name]:.2f} | {tokens[name]} | {tokens[name] / best[name]:,.0f} |")

    from torch.profiler import ProfilerActivity, profile

    print("\n| engine (one profiled call) | total ms | ms per decode step | share in matrix products |")
    print("| --- | --- | --- | --- |")
    for name, engine in (("static-cache decoder", static), ("model forward + transformers cache", generic)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.generate(prompts, sampling)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / 1e3
        steps = next((e.count for e in events if e.key == "aten::searchsorted"), NEW_TOKENS)  # one per decode step
        print(f"| {name} | {total:.0f} | {total / steps:.1f} | {matmul / total:.0%} |")


if __name__ == "__main__":
    main()
