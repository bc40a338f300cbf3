"""Evaluate a policy on held-out problems: greedy accuracy, pass@k from samples, rewards, lengths.

`evaluate_policy` is what the trainer calls before, during and after RL; `evaluate_checkpoint` is `tinyrl-eval`:
the same measurement on any saved checkpoint (a run's `checkpoints/step_*/actor`, `sft_model`, or any HF model dir).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tinyrl.evaluate import summarize_eval, write_eval_results
from tinyrl.monitor import call_with_timeout
from tinyrl.rollout import SamplingConfig


def evaluate_policy(
    engine,
    scorer,
    task,
    tokenizer,
    rows: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pass_k: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    timeout_s: float = float("inf"),
    run_dir: str | Path | None = None,
    step: int = 0,
) -> dict:
    """Greedy accuracy on `rows` (and pass@1..k from `pass_k` samples at `temperature` when pass_k > 0)."""
    stop = tuple(getattr(task, "stop", ()))
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop)
    completions = call_with_timeout(engine.generate, timeout_s, "evaluation", prompt_ids, greedy)
    rewards = scorer.score([c.text for c in completions], list(rows), [c.token_ids for c in completions])
    sampled, ks = None, []
    if pass_k > 0:
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, n=pass_k, temperature=max(temperature, 1e-5), top_p=top_p, stop=stop,
            seed=int(np.random.default_rng([seed, step, 99]).integers(0, 2**62)),
        )
        many = call_with_timeout(engine.generate, timeout_s, "evaluation sampling", prompt_ids, sampling)
        many_rewards = scorer.score(
            [c.text for c in many], [rows[c.prompt_index] for c in many], [c.token_ids for c in many]
        )
        sampled = [many_rewards[i * pass_k : (i + 1) * pass_k] for i in range(len(rows))]
        ks = sorted({1, pass_k} | ({pass_k // 2} if pass_k >= 4 else set()))
    summary = summarize_eval(rewards, sampled, ks, [len(c.token_ids) for c in completions])
    if run_dir is not None:
        prompts = [tokenizer.decode(p) for p in prompt_ids]
        write_eval_results(run_dir, step, summary, prompts, [c.text for c in completions], rewards)
    return summary


def evaluate_checkpoint(cfg) -> dict:
    """`tinyrl-eval`: load `cfg.checkpoint`, build the task split, and evaluate (see conf/eval.yaml)."""
    import torch

    from tinyrl.models import load_policy
    from tinyrl.prompts import encode_prompts
    from tinyrl.rollout import make_engine
    from tinyrl.task import RewardScorer, get_task
    from tinyrl.devices import resolve_device

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    rows = task.dataset(cfg.split, int(cfg.size), int(cfg.task.get("data_seed", 0)))
    model, tokenizer = load_policy(cfg.checkpoint, device=device)
    prompt_ids = encode_prompts(task, rows, tokenizer, cfg.template, int(cfg.max_prompt_tokens), cfg.split)
    engine = make_engine("hf", model, tokenizer, batch_size=int(cfg.batch_size))
    limits = {"cpu_s": float(cfg.task.get("reward_cpu_s", 10.0)), "memory_mb": int(cfg.task.get("reward_memory_mb", 4096))}
    timeout = float(cfg.task.get("reward_timeout_s", 5.0))
    with RewardScorer(task, workers=int(cfg.task.reward_workers), timeout=timeout, **limits) as scorer:
        summary = evaluate_policy(
            engine, scorer, task, tokenizer, rows, prompt_ids, max_new_tokens=int(cfg.max_response_tokens),
            pass_k=int(cfg.pass_k), temperature=float(cfg.temperature), seed=int(cfg.seed), run_dir=cfg.out, step=0,
        )
    summary["checkpoint"] = str(cfg.checkpoint)
    summary["split"] = cfg.split
    return summary
