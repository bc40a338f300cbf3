"""Seconds per GRPO step: tinyrl's RLTrainer against TRL's GRPOTrainer, same tiny model, same prompts, same run.

Both train the same randomly initialised tiny Qwen2 (the default run's shape: hidden 128, 2 layers, 384-token
vocabulary) on Countdown prompts (compact style), 64 prompts x 8 completions of up to 64 new tokens per step,
temperature 1, no KL (beta 0), one optimizer step per generation batch, float32 on the CPU. A random model rarely
stops early, so both generate close to 64 tokens per completion.

The reward is the share of digit characters in the completion: it differs between any two different completions, so
every group has reward variance and neither trainer can skip its update (tinyrl exactly skips rows whose advantage
is zero; a Countdown reward would be zero for every completion of a random model). Both compute it in-process.
Reported: mean seconds per step over steps 2..N (step 1 includes warm-up), tinyrl's seconds per phase, and a floor:
one bare forward+backward of the model over the rows of tinyrl's last update, which no trainer on this work can skip.

Usage: .venv/bin/python benchmarks/bench_rl_step.py [--steps 6] [--threads 2] [--prompts 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import torch

GROUP, NEW_TOKENS = 8, 64


def digit_share(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(1, len(text))


def build_model(directory: Path):
    from tinyrl.models import build_tiny_model
    from tinyrl.task import get_task

    task = get_task("countdown", max_numbers=3, max_number=20, max_target=50, prompt_style="compact", trace_misses=1,
                    format_score=0.0)  # as conf/task/countdown_tiny.yaml
    rows = task.dataset("train", 2000, 0)
    texts = [task.prompt(r) + (task.demonstration(r) or "") for r in rows]
    build_tiny_model(directory, texts, vocab_size=384, seed=0)
    return task, rows


def bench_tinyrl(model_dir: Path, run_dir: Path, task, steps: int, threads: int, prompts: int):
    from tinyrl.compose import load_config
    from tinyrl.task import Reward
    from tinyrl.trainer import RLTrainer

    class DigitShareTask(type(task)):
        def reward(self, completion: str, row: dict) -> Reward:
            return Reward(digit_share(completion), False, False, {})

    cfg = load_config([
        f"model.path={model_dir}", f"run_dir={run_dir}", "sft.enabled=false", "algorithm=grpo", "algorithm.kl_coef=0",
        f"trainer.prompts_per_step={prompts}", f"trainer.prompts_per_mini_batch={prompts}",
        f"rollout.n={GROUP}", f"rollout.max_response_tokens={NEW_TOKENS}", "trainer.lr=5e-5", "task.eval_size=8",
        "task.reward_workers=0", "trainer.samples_every=0", f"threads={threads}",
    ])
    custom = DigitShareTask(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)})
    trainer = RLTrainer.from_config(cfg, task=custom)
    updated = []  # the batch of the latest update, for the floor below
    update = trainer._update
    trainer._update = lambda batch, *args, **kwargs: (updated.append(batch), update(batch, *args, **kwargs))[1]
    times, lengths, phases, signal = [], [], [], []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            metrics = trainer.step()
            times.append(time.perf_counter() - start)
            lengths.append(metrics["response/length_mean"])
            phases.append({k[5:]: v for k, v in metrics.items() if k.startswith("time/")})
            signal.append(metrics.get("train/rows_with_signal", 1.0))
        floor = bare_forward_backward(trainer.policy, updated[-1])
    finally:
        trainer.close()
    later = phases[1:] or phases
    mean_phases = {p: sum(ph.get(p, 0.0) for ph in later) / len(later) for p in later[0]}
    return times, sum(lengths) / len(lengths), mean_phases, min(signal), floor


def bare_forward_backward(model, batch, repeats: int = 3) -> float:
    """Best seconds of one plain forward and backward pass of `model` over `batch`'s padded rows (the arithmetic any
    trainer must do to update on these completions), with a scalar loss of the response logits; best of `repeats`."""
    best = float("inf")
    model.train()
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                    logits_to_keep=batch.response_width + 1)
        out.logits.logsumexp(-1).sum().backward()
        best = min(best, time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    model.eval()
    return best


def bench_trl(model_dir: Path, out_dir: Path, task, rows, steps: int, prompts: int) -> tuple[list[float], float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    data = Dataset.from_list([{"prompt": task.prompt(r)} for r in rows])

    def digit_share_reward(prompts, completions, **kwargs):
        return [digit_share(c) for c in completions]

    stamps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
        use_vllm=False, per_device_train_batch_size=prompts * GROUP, num_generations=GROUP,
        max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, learning_rate=5e-5, max_steps=steps,
        logging_steps=1, save_strategy="no", num_iterations=1, steps_per_generation=1, seed=0,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=digit_share_reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    start = time.perf_counter()
    trainer.train()
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    return [b - a for a, b in zip([start] + stamps[:-1], stamps)], sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task, rows = build_model(tmp / "model")
        ours, our_length, phases, signal, floor = bench_tinyrl(tmp / "model", tmp / "tinyrl_run", task, args.steps,
                                                        args.threads, args.prompts)
        theirs, their_length = bench_trl(tmp / "model", tmp / "trl_run", task, rows, args.steps, args.prompts)
    import transformers
    import trl

    mean = lambda xs: sum(xs[1:]) / max(1, len(xs) - 1)  # noqa: E731
    print(f"\n{platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{args.prompts} prompts x {GROUP} completions x up to {NEW_TOKENS} new tokens per step; "
          f"smallest share of tinyrl rows with a non-zero advantage in any step: {signal:.3f}\n")
    print("| trainer | mean s/step (steps 2..N) | mean completion tokens | all steps (s) |")
    print("| --- | --- | --- | --- |")
    print(f"| tinyrl RLTrainer (hf engine) | {mean(ours):.2f} | {our_length:.1f} | {', '.join(f'{t:.2f}' for t in ours)} |")
    print(f"| TRL GRPOTrainer (generate) | {mean(theirs):.2f} | {their_length:.1f} | "
          f"{', '.join(f'{t:.2f}' for t in theirs)} |")
    print(f"\nratio TRL / tinyrl: {mean(theirs) / mean(ours):.2f}x; tinyrl seconds per phase (steps 2..N): "
          + ", ".join(f"{p} {s:.2f}" for p, s in sorted(phases.items(), key=lambda kv: -kv[1]) if s >= 0.005))
    print(f"floor: one bare forward+backward of the model over tinyrl's last step's padded rows takes {floor:.2f} s "
          f"(best of 3); a trainer that also generated in no time could be at most {mean(theirs) / floor:.2f}x faster "
          f"than TRL's step here")


if __name__ == "__main__":
    main()
