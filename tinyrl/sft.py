"""Supervised warm start on teacher traces (s1-style distillation) before RL: `run_sft` (the loop) and `distil`
(a run's distillation stage: traces, checkpoints, resume, the saved model).

Traces are (prompt, completion) pairs: from a JSONL file (`{"prompt", "completion"}` rows, or `{"messages"}` rows whose
last message is the assistant's), or written by the task's own teacher (`task.demonstration(row)`, e.g. Countdown's
exact solver). The loss is the mean negative log-likelihood of completion tokens only, over all completion tokens of a
batch (micro-batches are normalised by the whole batch's token count, so the token budget never changes the gradient).

A plain loop rather than TRL's SFTTrainer: it shares the trainer's token-budget micro-batching, dtype handling and
determinism (same seed, same batches), and on a CPU the tiny model spends more time in a trainer framework's
bookkeeping than in its own forward pass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tinyrl.batch import build_batch, split_by_tokens
from tinyrl.checkpoint import capture_rng, load_checkpoint_state, restore_rng, save_checkpoint
from tinyrl.config import SFTConfig, TrainConfig
from tinyrl.console import Console, Progress
from tinyrl.devices import resolve_dtype
from tinyrl.metrics import MetricsWriter, rewind_metrics
from tinyrl.monitor import stop_requests
from tinyrl.policy_ops import autocast_for, token_logprobs
from tinyrl.prompts import render_prompt


def read_traces(path: str | Path, tokenizer) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a JSONL file; errors name the file and line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
            if "prompt" in row and "completion" in row:
                pairs.append((str(row["prompt"]), str(row["completion"])))
            elif "messages" in row and row["messages"] and row["messages"][-1].get("role") == "assistant":
                prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
                pairs.append((prompt, str(row["messages"][-1]["content"])))
            else:
                raise ValueError(
                    f"{path}:{number}: a trace row needs 'prompt' and 'completion', or 'messages' ending with an "
                    f"assistant message; got keys {sorted(row)}"
                )
    if not pairs:
        raise ValueError(f"{path}: no traces")
    return pairs


def task_traces(task, rows: Sequence[dict], tokenizer, template: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs written by the task's teacher (`task.demonstration`), skipping unsolvable rows."""
    if not hasattr(task, "demonstration"):
        raise ValueError(f"task {task.name!r} has no demonstration(); set sft.traces_path to a JSONL file of traces")
    pairs = []
    for row in rows:
        completion = task.demonstration(row)
        if completion is not None:
            pairs.append((render_prompt(task, row, tokenizer, template), completion))
    if not pairs:
        raise ValueError(f"task {task.name!r} produced no demonstrations for {len(rows)} rows")
    return pairs


def tokenize_traces(pairs, tokenizer, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Token ids of each prompt and of its completion followed by EOS; over-long traces are an error."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        c = c + [eos]
        if len(p) + len(c) > max_tokens:
            raise ValueError(
                f"trace {i} has {len(p) + len(c)} tokens, more than the limit {max_tokens} "
                f"(rollout.max_prompt_tokens + rollout.max_response_tokens); raise them or shorten the traces"
            )
        out.append((p, c))
    return out


def run_sft(
    model,
    examples: Sequence[tuple[list[int], list[int]]],
    cfg: SFTConfig,
    *,
    pad_id: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    micro_batch_tokens: int,
    log: Callable[[int, dict], None] | None = None,
    log_every: int = 50,
    progress: Progress | None = None,
    state: dict | None = None,
    save: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Fine-tune `model` in place for `cfg.steps` steps of `cfg.batch_size` traces; returns final figures.

    Resumable exactly: `save(step, state)` is called every `cfg.save_every` steps and when `should_stop()` turns
    true (then `DistillationStopped` is raised after the save); passing that `state` back (with the model's
    weights as saved then) continues with the same batches, optimizer moments and schedule.
    `progress` (a `tinyrl.console.Progress`) is updated every step with the loss.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.steps))
    rng = np.random.default_rng([seed, 1])
    done, recent, seconds_before = 0, [], 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["batch_rng"]
        restore_rng(state["rng"])
        done, recent, seconds_before = state["step"], list(state["recent_losses"]), state["seconds"]
    model.train()
    start, loss_sum = time.perf_counter(), float("nan")

    def snapshot(step: int) -> dict:
        return {
            "step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "batch_rng": rng.bit_generator.state, "rng": capture_rng(), "recent_losses": list(recent),
            "seconds": seconds_before + time.perf_counter() - start,
        }

    for step in range(done + 1, cfg.steps + 1):
        picked = rng.choice(len(examples), size=min(cfg.batch_size, len(examples)), replace=False)
        batch = build_batch(
            [examples[i][0] for i in picked],
            [examples[i][1] for i in picked],
            scores=[0.0] * len(picked),
            group_index=list(range(len(picked))),
            pad_id=pad_id,
        )
        total_tokens = batch.response_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for rows in split_by_tokens(batch, range(batch.size), micro_batch_tokens):
            mb = batch.select(rows).to(device)
            with autocast_for(device, dtype):
                logprobs, _ = token_logprobs(model, mb, temperature=1.0)
            loss = -(logprobs * mb.response_mask).sum() / total_tokens
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        recent.append(loss_sum)
        if log is not None and (step % log_every == 0 or step == cfg.steps):
            log(step, {"sft/loss": float(np.mean(recent)), "sft/lr": schedule.get_last_lr()[0]})
            recent = []
        if progress is not None:
            progress.update(step, {"loss": loss_sum})
        stopping = should_stop is not None and should_stop()
        if save is not None and step < cfg.steps and (stopping or (cfg.save_every and step % cfg.save_every == 0)):
            save(step, snapshot(step))
        if stopping and step < cfg.steps:
            raise DistillationStopped(step, cfg.steps)
    model.eval()
    seconds = seconds_before + time.perf_counter() - start
    return {"sft_steps": cfg.steps, "sft_seconds": seconds, "sft_final_loss": loss_sum}


class DistillationStopped(KeyboardInterrupt):
    """Distillation stopped by a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"distillation stopped at step {step} of {total}; checkpoint saved")
        self.step = step


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distil(cfg: TrainConfig, run_dir: Path, policy, tokenizer, task, train_rows: list[dict], device: torch.device,
           checkpoint: Path | None, console: Console, *, steps: int | None = None, out_name: str = "sft_model",
           log_name: str = "sft") -> dict:
    """Supervised warm start on teacher traces for `steps` (default `sft.steps`), continuing from `checkpoint` (in
    `run_dir/log_name/checkpoints`) when given; checkpoints every `sft.save_every` steps and on SIGTERM/SIGINT;
    saves `run_dir/out_name/` atomically (and, for the warm start itself, `sft_summary.json`)."""
    if cfg.sft.traces_path:
        pairs = read_traces(cfg.sft.traces_path, tokenizer)
    else:
        pairs = task_traces(task, train_rows[: cfg.sft.num_traces], tokenizer, cfg.model.template)
    examples = tokenize_traces(pairs, tokenizer, cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens)
    state = load_checkpoint_state(checkpoint) if checkpoint is not None else None
    sft_cfg = replace(cfg.sft, steps=cfg.sft.steps if steps is None else steps)
    sft_run = run_dir / log_name
    if sft_run.is_dir():  # a resumed distillation: rows after its checkpoint are re-run
        rewind_metrics(sft_run, state["metrics_offset"] if state is not None else 0)
    sft_log = MetricsWriter(sft_run)

    def save(step: int, sft_state: dict) -> None:
        sft_state["metrics_offset"] = sft_log.offset()
        save_checkpoint(sft_run, step, {"actor": policy}, tokenizer, sft_state, keep_last=1)

    done = state["step"] if state is not None else 0
    console.say(f"distillation: {len(examples)} teacher traces, {sft_cfg.steps} steps of {sft_cfg.batch_size}"
                + (f", continuing after step {done}" if done else ""))
    progress = None
    if sft_cfg.steps:
        progress = Progress(sft_cfg.steps, start_step=done, enabled=cfg.logging.progress, label="distillation step")
    try:
        with stop_requests() as stop:
            summary = run_sft(
                policy, examples, sft_cfg, pad_id=tokenizer.pad_token_id, seed=cfg.seed, device=device,
                dtype=resolve_dtype(cfg.model.dtype, device), micro_batch_tokens=cfg.trainer.micro_batch_tokens,
                log=sft_log.write, log_every=min(50, max(1, sft_cfg.steps // 10)), progress=progress, state=state,
                save=save, should_stop=lambda: stop["signal"] is not None,
            )
    finally:
        sft_log.close()
        if progress is not None:
            progress.close()
    out_dir, staging = run_dir / out_name, run_dir / f"{out_name}.tmp"
    policy.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():  # a baseline arm redone after a kill between its save and the summary
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    if out_name == "sft_model":
        (run_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(sft_run / "checkpoints", ignore_errors=True)  # sft_model/ supersedes them
    return summary
