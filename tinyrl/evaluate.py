"""Evaluation maths and aggregation: greedy accuracy, unbiased pass@k, reward and length statistics.

Generation is the caller's job (any rollout engine, any checkpoint); this module turns the verifier's
`Reward`s into the figures a run reports and writes them, with a sample of completions, to the run directory.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinyrl.task import reward_rates

if TYPE_CHECKING:
    from tinyrl.task import Reward

__all__ = ["pass_at_k", "summarize_eval", "eval_metrics", "write_eval_results"]


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
