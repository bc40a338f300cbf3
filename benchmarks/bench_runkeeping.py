"""Cost of the run-keeping utilities per training step: checkpoint save/load, metrics rows, plots, eval maths.

    .venv/bin/python benchmarks/bench_runkeeping.py            # prints a markdown table
    .venv/bin/python benchmarks/bench_runkeeping.py --quick    # smaller model and files, for a smoke run

The checkpoint figures compare `save_checkpoint` (temp dir, fsync of every file, rename, prune) with a bare
`save_pretrained` of the same models, so the price of crash safety is visible on its own.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tinyrl.checkpoint import capture_rng, latest_checkpoint, load_checkpoint_state, save_checkpoint
from tinyrl.evaluate import pass_at_k, summarize_eval
from tinyrl.metrics import MetricsWriter, read_metrics
from tinyrl.monitor import PhaseTimer, call_with_timeout
from tinyrl.plots import plot_run
from tinyrl.task import Reward


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls after one untimed warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_checkpoint(root: Path, hidden: int, layers: int, vocab: int, repeats: int) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # materialise Adam moments: the trainer state is 2x the weights
    state = {"step": 1, "optimizer": optimizer.state_dict(), "rng": capture_rng()}

    plain_dir = root / "plain"

    def plain() -> None:
        shutil.rmtree(plain_dir, ignore_errors=True)
        model.save_pretrained(plain_dir / "actor")
        torch.save(state, plain_dir / "trainer_state.pt")

    run_dir = root / "run"
    step = iter(range(1, 10_000))
    plain_s = best_of(plain, repeats)
    safe_s = best_of(lambda: save_checkpoint(run_dir, next(step), {"actor": model}, None, state, keep_last=2), repeats)
    latest = latest_checkpoint(run_dir)
    find_s = best_of(lambda: latest_checkpoint(run_dir), 20)
    load_s = best_of(lambda: load_checkpoint_state(latest), repeats)
    size_mb = dir_size(latest) / 2**20
    return [
        ("model", f"Qwen2 shape, {params / 1e6:.1f} M parameters (fp32), AdamW state; checkpoint {size_mb:.0f} MiB"),
        ("save_pretrained + torch.save (no safety)", f"{plain_s:.3f} s"),
        ("save_checkpoint (temp dir, fsync, rename, prune)", f"{safe_s:.3f} s ({safe_s / plain_s:.2f}x)"),
        ("latest_checkpoint", f"{find_s * 1e3:.2f} ms"),
        ("load_checkpoint_state", f"{load_s:.3f} s"),
    ]


def bench_metrics(root: Path, rows: int, steps_plot: int) -> list[tuple[str, str]]:
    run_dir = root / "metrics"
    names = [
        "reward/mean", "reward/accuracy", "reward/format_rate", "response/length_mean", "response/length_max",
        "response/clip_rate", "policy/kl", "policy/entropy", "policy/clip_frac_low", "policy/clip_frac_high",
        "losses/policy", "losses/value", "optim/grad_norm", "optim/lr", "time/generate", "time/score",
        "time/update", "time/sync", "train/completions", "train/groups_used",
    ]
    rng = random.Random(0)
    writer = MetricsWriter(run_dir)
    start = time.perf_counter()
    for step in range(1, rows + 1):
        writer.write(step, {name: rng.random() for name in names})
    write_s = (time.perf_counter() - start) / rows
    writer.close()
    read_s = best_of(lambda: read_metrics(run_dir), 3)

    plot_dir = root / "plot"
    with MetricsWriter(plot_dir) as plot_writer:
        for step in range(1, steps_plot + 1):
            plot_writer.write(step, {name: rng.random() for name in names})
            if step % 50 == 0:
                plot_writer.write(step, {"eval/accuracy": rng.random(), "eval/pass@8": rng.random()})
    plot_s = best_of(lambda: plot_run(plot_dir), 3)
    return [
        ("MetricsWriter.write (20 metrics, flush + fsync)", f"{write_s * 1e3:.3f} ms/row"),
        (f"read_metrics ({rows} rows)", f"{read_s * 1e3:.1f} ms"),
        (f"plot_run ({steps_plot} steps)", f"{plot_s:.2f} s"),
    ]


def bench_eval_and_monitor(problems: int, samples: int) -> list[tuple[str, str]]:
    rng = random.Random(0)

    def reward() -> Reward:
        correct = rng.random() < 0.3
        return Reward(score=1.0 if correct else 0.1, correct=correct, formatted=True, info={})

    greedy = [reward() for _ in range(problems)]
    sampled = [[reward() for _ in range(samples)] for _ in range(problems)]
    summary_s = best_of(lambda: summarize_eval(greedy, sampled, ks=[1, 4, samples]), 3)
    pass_s = best_of(lambda: pass_at_k(10_000, 10, 5_000), 20)

    timer = PhaseTimer()

    def phases() -> None:
        for step in range(1000):
            with timer.phase("generate", step):
                pass

    phase_s = best_of(phases, 3) / 1000
    timeout_s = best_of(lambda: [call_with_timeout(math.sqrt, 10.0, "sqrt", 2.0) for _ in range(200)], 3) / 200
    return [
        (f"summarize_eval ({problems} problems x {samples} samples, 3 ks)", f"{summary_s * 1e3:.1f} ms"),
        ("pass_at_k(n=10000, c=10, k=5000)", f"{pass_s * 1e6:.1f} us"),
        ("PhaseTimer.phase overhead", f"{phase_s * 1e6:.1f} us"),
        ("call_with_timeout overhead (thread per call)", f"{timeout_s * 1e6:.0f} us"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="tinyrl-bench-") as tmp:
        root = Path(tmp)
        if args.quick:
            results = bench_checkpoint(root, hidden=128, layers=2, vocab=1024, repeats=2)
            results += bench_metrics(root, rows=200, steps_plot=200)
            results += bench_eval_and_monitor(problems=100, samples=8)
        else:
            results = bench_checkpoint(root, hidden=512, layers=8, vocab=32_000, repeats=3)
            results += bench_metrics(root, rows=2000, steps_plot=2000)
            results += bench_eval_and_monitor(problems=1024, samples=16)
    print("| measurement | result |")
    print("| --- | --- |")
    for name, value in results:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
