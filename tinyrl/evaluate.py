"""Evaluation on held-out problems: greedy accuracy, unbiased pass@k, reward and length statistics.

`sample_eval` generates with any rollout engine (greedy, and `pass_k` samples per problem) and scores with a
`RewardScorer`; `summarize_samples` / `summarize_eval` turn the verifier's `Reward`s into the figures a run
reports; `write_eval_samples` / `write_eval_results` write them, with a sample of completions, to the run
directory. `evaluate_policy` is all three on one problem set, `evaluate_on_ranks` the same split over the ranks
(what the trainer runs); `tinyrl-eval` (tinyrl/eval_checkpoint.py) runs `evaluate_policy` on a saved checkpoint.
Accuracy counts only `Reward.correct`: a format bonus can raise `mean_reward` but never `accuracy`. A figure the
rewards cannot speak for is None, "not reported" (accuracy when no reward judges correctness, as with TRL reward
functions none of which is named the correctness signal); rewards that do not apply are left out of every figure
(`tinyrl.task.reward_rates`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinyrl.monitor import call_with_timeout
from tinyrl.rollout import SamplingConfig
from tinyrl.task import reward_rates

if TYPE_CHECKING:
    from tinyrl.task import Reward

__all__ = [
    "EvalSamples", "eval_metrics", "evaluate_on_ranks", "evaluate_policy", "pass_at_k", "sample_eval", "summarize_eval",
    "summarize_samples", "write_eval_results", "write_eval_samples",
]


@dataclass
class EvalSamples:
    """What evaluating some problems produced: greedy completions and their rewards, and per problem the
    rewards of `pass_k` samples (None without pass@k). Parts for disjoint problem ranges concatenate (`+`)."""

    completions: list
    rewards: list
    sampled: list | None = None

    def __add__(self, other: "EvalSamples") -> "EvalSamples":
        sampled = None if self.sampled is None else self.sampled + other.sampled
        return EvalSamples(self.completions + other.completions, self.rewards + other.rewards, sampled)


def sample_eval(
    engine,
    scorer,
    task,
    rows: Sequence[dict],
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pass_k: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    timeout_s: float = float("inf"),
    step: int = 0,
    prompt_offset: int = 0,
) -> EvalSamples:
    """Greedy completions of `rows` (and `pass_k` samples each) with their rewards.

    `prompt_offset`: the position of `rows[0]` in the whole evaluation set, so that a share of the set draws
    the samples the whole set would (see `SamplingConfig.prompt_offset`).
    """
    stop = tuple(getattr(task, "stop", ()))
    feedback = getattr(task, "feedback", None)
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop, feedback=feedback)
    completions = call_with_timeout(engine.generate, timeout_s, "evaluation", prompt_ids, greedy)
    rewards = scorer.score([c.text for c in completions], list(rows), [c.token_ids for c in completions])
    sampled = None
    if pass_k > 0:
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, n=pass_k, temperature=max(temperature, 1e-5), top_p=top_p, stop=stop,
            seed=int(np.random.default_rng([seed, step, 99]).integers(0, 2**62)), prompt_offset=prompt_offset,
            feedback=feedback,
        )
        many = call_with_timeout(engine.generate, timeout_s, "evaluation sampling", prompt_ids, sampling)
        many_rewards = scorer.score(
            [c.text for c in many], [rows[c.prompt_index] for c in many], [c.token_ids for c in many]
        )
        sampled = [many_rewards[i * pass_k : (i + 1) * pass_k] for i in range(len(rows))]
    return EvalSamples(list(completions), list(rewards), sampled)


def summarize_samples(samples: EvalSamples, pass_k: int = 0) -> dict:
    """`summarize_eval` of what `sample_eval` produced (pass@1, @k/2 and @k when pass_k > 0)."""
    ks = sorted({1, pass_k} | ({pass_k // 2} if pass_k >= 4 else set())) if pass_k > 0 else []
    return summarize_eval(samples.rewards, samples.sampled, ks, [len(c.token_ids) for c in samples.completions])


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
    samples = sample_eval(
        engine, scorer, task, rows, prompt_ids, max_new_tokens=max_new_tokens, pass_k=pass_k,
        temperature=temperature, top_p=top_p, seed=seed, timeout_s=timeout_s, step=step,
    )
    summary = summarize_samples(samples, pass_k)
    if run_dir is not None:
        write_eval_samples(run_dir, step, summary, tokenizer, prompt_ids, samples)
    return summary


def evaluate_on_ranks(world, engine, scorer, task, tokenizer, rows: Sequence[dict],
                      prompt_ids: Sequence[Sequence[int]], *, run_dir: str | Path, step: int, pass_k: int = 0,
                      **sampling: Any) -> dict:
    """`evaluate_policy` with the problems split over the ranks of `world` (`tinyrl.distributed.World`): each rank
    samples and scores a contiguous share, drawing the samples the whole set would; the summary covers them all and
    rank 0 writes `run_dir/eval/step_*.json`. `sampling`: `sample_eval`'s `max_new_tokens`, `temperature`, `top_p`,
    `seed`, `timeout_s`. Collective."""
    share = world.share(len(rows))
    part = sample_eval(engine, scorer, task, rows[share.start : share.stop], prompt_ids[share.start : share.stop],
                       pass_k=pass_k, step=step, prompt_offset=share.start, **sampling)
    samples = world.concat(part)
    summary = summarize_samples(samples, pass_k)
    if world.is_main:
        write_eval_samples(run_dir, step, summary, tokenizer, prompt_ids, samples)
    return summary


def write_eval_samples(run_dir, step: int, summary: dict, tokenizer, prompt_ids, samples: EvalSamples) -> Path:
    """`write_eval_results` for what `sample_eval` produced."""
    prompts = [tokenizer.decode(p) for p in prompt_ids]
    return write_eval_results(run_dir, step, summary, prompts, [c.text for c in samples.completions], samples.rewards)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct.

    Formula: pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", the Codex paper, eq. 1).

    The product form never builds the huge binomials, so it stays exact to float precision for any n.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"pass_at_k: {name} must be an int, got {type(value).__name__} {value!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"pass_at_k: n (samples per problem) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c (correct samples) must satisfy 0 <= c <= n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must satisfy 1 <= k <= n={n}, got {k}")
    if n - c < k:
        # Every k-subset must contain at least one correct sample.
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _check_rewards(rewards: Sequence[Any], where: str) -> None:
    for i, reward in enumerate(rewards):
        for attr in ("score", "correct", "formatted"):
            if not hasattr(reward, attr):
                raise TypeError(
                    f"{where}[{i}] is a {type(reward).__name__} without .{attr}; expected tinyrl.task.Reward"
                )


def summarize_eval(
    rewards_greedy: Sequence[Reward],
    rewards_sampled: Sequence[Sequence[Reward]] | None,
    ks: Sequence[int],
    response_lengths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Aggregate one evaluation pass over a task split.

    `rewards_greedy[i]` scores the greedy completion of problem i; `rewards_sampled[i]` scores the n sampled
    completions of the same problem (needed only for pass@k). `response_lengths` are the greedy responses'
    lengths in tokens. Returns accuracy, mean_reward, format_rate, pass@k per k, n_problems, the sampled
    accuracy/mean reward when samples are given, and response length mean/median/min/max when lengths are given.
    """
    if len(rewards_greedy) == 0:
        raise ValueError("summarize_eval: rewards_greedy is empty; evaluate at least one problem")
    _check_rewards(rewards_greedy, "rewards_greedy")
    ks = list(ks)
    if ks and rewards_sampled is None:
        raise ValueError(f"summarize_eval: pass@k for ks={ks} needs rewards_sampled (n samples per problem)")

    greedy = reward_rates(rewards_greedy)
    summary: dict[str, Any] = {
        "n_problems": len(rewards_greedy),
        "accuracy": greedy["accuracy"],
        "mean_reward": greedy["mean_reward"],
        "format_rate": greedy["format_rate"],
        "pass@k": {},
    }
    if greedy["not_applicable"]:
        summary["not_applicable"] = int(greedy["not_applicable"])

    if rewards_sampled is not None:
        if len(rewards_sampled) != len(rewards_greedy):
            raise ValueError(
                f"summarize_eval: rewards_sampled has {len(rewards_sampled)} problems but rewards_greedy has "
                f"{len(rewards_greedy)}; both must cover the same problems in the same order"
            )
        for i, samples in enumerate(rewards_sampled):
            if len(samples) == 0:
                raise ValueError(f"summarize_eval: rewards_sampled[{i}] is empty; each problem needs n >= 1 samples")
            _check_rewards(samples, f"rewards_sampled[{i}]")
        flat = [r for samples in rewards_sampled for r in samples]
        sampled = reward_rates(flat)
        for k in ks:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(f"summarize_eval: every k in ks must be an int >= 1, got {k!r}")
            if sampled["accuracy"] is None:
                continue  # no reward says whether an answer is right: pass@k is not reported either
            per_problem = []
            for i, samples in enumerate(rewards_sampled):
                if k > len(samples):
                    raise ValueError(
                        f"summarize_eval: pass@{k} needs at least {k} samples per problem, "
                        f"problem {i} has {len(samples)}"
                    )
                per_problem.append(pass_at_k(len(samples), sum(1 for r in samples if r.correct), k))
            summary["pass@k"][int(k)] = _mean(per_problem)
        summary["sampled_accuracy"] = sampled["accuracy"]
        summary["sampled_mean_reward"] = sampled["mean_reward"]

    if response_lengths is not None:
        if len(response_lengths) != len(rewards_greedy):
            raise ValueError(
                f"summarize_eval: response_lengths has {len(response_lengths)} entries for "
                f"{len(rewards_greedy)} problems"
            )
        lengths = [int(x) for x in response_lengths]
        summary["response_length_mean"] = _mean(lengths)
        summary["response_length_median"] = float(statistics.median(lengths))
        summary["response_length_min"] = min(lengths)
        summary["response_length_max"] = max(lengths)
    return summary


def eval_metrics(summary: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flatten a `summarize_eval` result into metric names for `MetricsWriter` (`eval/accuracy`, `eval/pass@4`...)."""
    metrics: dict[str, float] = {}
    for key, value in summary.items():
        if key == "pass@k":
            for k, v in sorted(value.items()):
                metrics[f"{prefix}/pass@{k}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"{prefix}/{key}"] = float(value)
    return metrics


def write_eval_results(
    run_dir: str | os.PathLike,
    step: int,
    summary: dict[str, Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    rewards: Sequence[Reward],
    max_samples: int = 16,
) -> Path:
    """Write `run_dir/eval/step_{step:08d}.json`: the summary plus the first `max_samples` completions with scores.

    The file is written under a temporary name and renamed into place, so a reader never sees half of it.
    """
    if not (len(prompts) == len(completions) == len(rewards)):
        raise ValueError(
            f"write_eval_results: prompts ({len(prompts)}), completions ({len(completions)}) and rewards "
            f"({len(rewards)}) must have the same length"
        )
    if max_samples < 0:
        raise ValueError(f"write_eval_results: max_samples must be >= 0, got {max_samples}")
    _check_rewards(rewards, "rewards")
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "step": int(step),
        "summary": _jsonable(summary),
        "samples": [
            {
                "prompt": prompt,
                "completion": completion,
                "score": float(reward.score),
                "correct": reward.correct if reward.correct is None else bool(reward.correct),
                "formatted": reward.formatted if reward.formatted is None else bool(reward.formatted),
            }
            for prompt, completion, reward in list(zip(prompts, completions, rewards))[:max_samples]
        ],
    }
    path = out_dir / f"step_{int(step):08d}.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    text = json.dumps(_jsonable(record), indent=2, ensure_ascii=False, allow_nan=False)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    """Dict keys as strings, non-finite floats as null, so the file is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
