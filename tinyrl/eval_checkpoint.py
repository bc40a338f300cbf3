"""Evaluate a policy on held-out problems: greedy accuracy, pass@k from samples, rewards, lengths.

`evaluate_policy` measures a policy on a problem set; the trainer runs its parts (`sample_eval` on each rank's
share, `summarize_samples` on them all) before, during and after RL. `evaluate_checkpoint` is `tinyrl-eval`: the
same measurement on any saved checkpoint (a run's `checkpoints/step_*/actor`, `sft_model`, or any HF model dir).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tinyrl.evaluate import summarize_eval, write_eval_results
from tinyrl.monitor import call_with_timeout
from tinyrl.rollout import SamplingConfig


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


def write_eval_samples(run_dir, step: int, summary: dict, tokenizer, prompt_ids, samples: EvalSamples) -> Path:
    """`write_eval_results` for what `sample_eval` produced."""
    prompts = [tokenizer.decode(p) for p in prompt_ids]
    return write_eval_results(run_dir, step, summary, prompts, [c.text for c in samples.completions], samples.rewards)


# tinyrl-eval keys and the run config keys they default to for a checkpoint written by a run
RUN_SETTINGS = {
    "split": "task.eval_split",
    "size": "task.eval_size",
    "template": "model.template",
    "max_prompt_tokens": "rollout.max_prompt_tokens",
    "max_response_tokens": "rollout.max_response_tokens",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
}


# training keys of the task group that tinyrl-eval does not read, and the tinyrl-eval keys that say the same
TRAINING_ONLY_KEYS = {"task.eval_size": "size", "task.eval_split": "split"}


def refuse_training_only_keys(overrides: Sequence[str]) -> None:
    """A `task.eval_size` or `task.eval_split` on tinyrl-eval's command line would be ignored (it scores `size`
    problems of `split`): refuse it, naming the key to give instead."""
    from tinyrl.compose import override_keys
    from tinyrl.config import ConfigError

    ignored = sorted(override_keys(overrides) & TRAINING_ONLY_KEYS.keys())
    if ignored:
        raise ConfigError(f"tinyrl-eval does not read {ignored[0]}; give {TRAINING_ONLY_KEYS[ignored[0]]}=... for the "
                          f"problems it scores")


def run_of_checkpoint(checkpoint: str | Path) -> Path | None:
    """The run directory that wrote a model directory (`checkpoints/step_*/actor`, `sft_model`, `base_model`):
    the nearest parent, at most three levels up, holding a training run's `config.yaml`."""
    from omegaconf import OmegaConf

    path = Path(checkpoint).resolve()
    for candidate in list(path.parents)[:3]:
        saved = candidate / "config.yaml"
        if saved.is_file():
            config = OmegaConf.load(saved)
            if all(key in config for key in ("task", "rollout", "trainer")):
                return candidate
    return None


def with_run_settings(cfg, overrides: Sequence[str] = ()):
    """`cfg` (conf/eval.yaml) with the task and generation settings of the run that wrote `cfg.checkpoint`, except
    the keys named in `overrides`; returns it and the run directory (None for a model no run wrote)."""
    from omegaconf import OmegaConf

    from tinyrl.compose import override_keys

    run_dir = run_of_checkpoint(cfg.checkpoint)
    if run_dir is None:
        return cfg, None
    given = override_keys(overrides)
    saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if not any(key == "task" or key.startswith("task.") for key in given):
        cfg.task = saved.task
    for key, run_key in RUN_SETTINGS.items():
        if key not in given:
            cfg[key] = OmegaConf.select(saved, run_key, default=cfg[key])
    return cfg, run_dir


def evaluate_checkpoint(cfg, overrides: Sequence[str] = ()) -> dict:
    """`tinyrl-eval`: load `cfg.checkpoint`, build the task split, and evaluate (see conf/eval.yaml).

    A checkpoint written by a run is evaluated with that run's task and generation settings (`with_run_settings`);
    the keys named in `overrides` (the command line's) win.
    """
    import torch

    from tinyrl.devices import resolve_device
    from tinyrl.models import load_policy
    from tinyrl.prompts import encode_prompts
    from tinyrl.rollout import make_engine
    from tinyrl.task import RewardScorer, TooFewProblems, get_task

    refuse_training_only_keys(overrides)
    cfg, run_dir = with_run_settings(cfg, overrides)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    try:
        rows = task.dataset(cfg.split, int(cfg.size), int(cfg.task.get("data_seed", 0)))
    except TooFewProblems as err:
        from tinyrl.config import ConfigError

        raise ConfigError(f"size: {err}") from None
    model, tokenizer = load_policy(cfg.checkpoint, device=device)
    prompt_ids = encode_prompts(task, rows, tokenizer, cfg.template, int(cfg.max_prompt_tokens), cfg.split)
    engine = make_engine("hf", model, tokenizer, batch_size=int(cfg.batch_size))
    limits = {"cpu_s": float(cfg.task.get("reward_cpu_s", 10.0)), "memory_mb": int(cfg.task.get("reward_memory_mb", 4096))}
    timeout = float(cfg.task.get("reward_timeout_s", 5.0))
    with RewardScorer(task, workers=int(cfg.task.reward_workers), timeout=timeout, **limits) as scorer:
        summary = evaluate_policy(
            engine, scorer, task, tokenizer, rows, prompt_ids, max_new_tokens=int(cfg.max_response_tokens),
            pass_k=int(cfg.pass_k), temperature=float(cfg.temperature), top_p=float(cfg.top_p), seed=int(cfg.seed),
            run_dir=cfg.out, step=0,
        )
    summary["checkpoint"] = str(cfg.checkpoint)
    summary["split"] = cfg.split
    summary["settings_from"] = str(run_dir / "config.yaml") if run_dir is not None else None
    summary["settings"] = {key: cfg[key] for key in RUN_SETTINGS} | {"task": cfg.task.name}
    return summary
