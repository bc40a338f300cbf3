"""`tinyrl-eval`: the held-out measurement of a run (tinyrl/evaluate.py) on any saved checkpoint (a run's
`checkpoints/step_*/actor`, `sft_model`, or any Hugging Face model directory), with the task and generation
settings of the run that wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


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


def model_directory(checkpoint: str) -> str:
    """The model directory `tinyrl-eval checkpoint=...` names: a model folder as given, or the `actor/` inside a
    run's `checkpoints/step_*`. A path that holds no model is refused in one line (a hub id is left to
    transformers)."""
    from tinyrl.config import ConfigError

    path = Path(checkpoint).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "actor" / "config.json").is_file():
            return str(path / "actor")
        raise ConfigError(f"checkpoint: {path} holds no model (no config.json); give a run's "
                          f"checkpoints/step_*/actor, sft_model or base_model, or a Hugging Face model directory")
    looks_like_a_path = checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") > 1 or path.exists()
    if looks_like_a_path:
        raise ConfigError(f"checkpoint: {path} is not a directory")
    return checkpoint


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
    from tinyrl.evaluate import evaluate_policy
    from tinyrl.models import load_policy
    from tinyrl.prompts import encode_prompts
    from tinyrl.reward_workers import scorer_from_config
    from tinyrl.rollout import make_engine
    from tinyrl.task import TooFewProblems, get_task

    refuse_training_only_keys(overrides)
    cfg.checkpoint = model_directory(str(cfg.checkpoint))
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
    with scorer_from_config(task, cfg.task) as scorer:
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
