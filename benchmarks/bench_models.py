"""What the tiny local model costs: building it, loading it, tokenising, and running it on the CPU.

    .venv/bin/python benchmarks/bench_models.py            # prints a markdown table
    .venv/bin/python benchmarks/bench_models.py --quick    # fewer texts and shorter runs, for a smoke run

The model is the default of `tinyrl.models.build_tiny_model` (hidden 128, 2 layers, 4 heads, vocab 512),
trained on Countdown-like prompts; these are the sizes tests and the CPU demo use.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tinyrl.models import build_tiny_model, count_parameters, load_critic, load_policy, train_tokenizer


def countdown_like_text(rng: random.Random) -> str:
    numbers = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
    a, b, c = numbers[:3]
    return (
        f"Using the numbers {numbers}, make {rng.randint(10, 200)}. Each number may be used once.\n"
        f"Assistant: <think>Try {a}+{b} = {a + b}, then times {c}.</think> <answer>({a}+{b})*{c}</answer>"
    )


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one untimed warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs for a smoke run")
    args = parser.parse_args()
    n_texts, repeats, batch, seq, new_tokens = (200, 1, 2, 64, 8) if args.quick else (2000, 3, 8, 256, 64)

    rng = random.Random(0)
    texts = [countdown_like_text(rng) for _ in range(n_texts)]
    rows: list[tuple[str, str]] = []
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        rows.append((f"train_tokenizer, {n_texts} prompts", f"{median_time(lambda: train_tokenizer(texts), repeats) * 1e3:.0f} ms"))
        build_s = median_time(lambda: build_tiny_model(Path(tmp) / "tiny", texts), repeats)
        rows.append((f"build_tiny_model (tokenizer + init + save), {n_texts} prompts", f"{build_s * 1e3:.0f} ms"))
        rows.append(("load_policy", f"{median_time(lambda: load_policy(Path(tmp) / 'tiny'), repeats) * 1e3:.0f} ms"))
        rows.append(("load_critic (from the policy checkpoint)",
                     f"{median_time(lambda: load_critic(Path(tmp) / 'tiny'), repeats) * 1e3:.0f} ms"))
        model, tokenizer = load_policy(Path(tmp) / "tiny")
        size_mb = (Path(tmp) / "tiny" / "model.safetensors").stat().st_size / 2**20

    rows.append(("parameters", f"{count_parameters(model):,}"))
    rows.append(("model.safetensors", f"{size_mb:.2f} MiB"))

    encode_s = median_time(lambda: tokenizer(texts)["input_ids"], repeats)
    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
    rows.append((f"tokenizer batch encode, {n_texts} prompts", f"{n_chars / encode_s / 1e6:.2f} M chars/s"))
    rows.append(("tokens per character on these prompts", f"{n_tokens / n_chars:.3f}"))

    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward_s = median_time(lambda: model(input_ids=ids).logits, repeats)
    rows.append((f"forward, no grad, {batch}x{seq} tokens", f"{batch * seq / forward_s:,.0f} tokens/s"))

    model.train()

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    train_s = median_time(train_step, repeats)
    rows.append((f"forward + backward, {batch}x{seq} tokens", f"{batch * seq / train_s:,.0f} tokens/s"))
    model.eval()

    prompts = tokenizer(texts[:batch], return_tensors="pt", padding=True)

    def generate() -> None:
        model.generate(**prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True)

    generate_s = median_time(generate, repeats)
    rows.append((f"generate (sampling), batch {batch}, {new_tokens} new tokens",
                 f"{batch * new_tokens / generate_s:,.0f} tokens/s"))
    rows.append(("1-min load average at start / end (other processes share the cores)",
                 f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"))
    rows.append(("peak RSS of this process", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"))

    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
