"""Run directories: where a run writes, the config a resumed run continues with, and its checkpoint.

A run directory holds one run. Starting a run in a directory that already holds something is refused (resume it,
or pick another directory); an empty or missing directory is fine. A resumed run keeps the config it was started
with (`config.yaml` in its directory): overrides given with `resume` may change only `SAFE_ON_RESUME`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tinyrl.config import ConfigError, TrainConfig, schema_keys
from tinyrl.metrics import rewind_metrics

log = logging.getLogger("tinyrl")

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"

# Keys a resumed run may change: none of them changes the problems, the model or the arithmetic of an update.
SAFE_ON_RESUME = (
    "trainer.steps",  # extend (or shorten) the run
    "trainer.eval_every",  # evaluation draws no training randomness
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.samples_every",
    "trainer.max_bad_steps",
    "trainer.micro_batch_tokens",  # memory knobs: same gradient (up to float rounding)
    "model.gradient_checkpointing",
    "rollout.batch_size",
    "rollout.gpu_memory_utilization",
    "rollout.timeout_s",
    "task.reward_workers",
    "task.reward_timeout_s",  # limits on failing rewards: they change only which failures score 0
    "task.reward_cpu_s",
    "task.reward_memory_mb",
    "task.reward_error_limit",
    "threads",  # where the arithmetic runs: float rounding may differ, nothing else
    "device",
    "distributed.timeout_s",
    "distributed.cpu_offload",
    "logging.tensorboard",
    "logging.wandb",
    "logging.progress",
    "logging.plot",
    "baseline.enabled",  # the distillation-only arms run after RL and change nothing in it
    "baseline.arms",
)
_WHERE = ("run_dir", "resume")  # where the run is: always taken from what was given


def resuming(resume: Any) -> bool:
    return resume not in (False, None, "false", "False")


def resumed_run_dir(run_dir: str | None, resume: Any) -> Path | None:
    """The directory of the run that `resume` continues (`true`: `run_dir`; a run or checkpoint directory)."""
    if not resuming(resume):
        return None
    if resume in (True, "true", "True"):
        if not run_dir:
            raise ConfigError("resume=true needs run_dir=<the run to resume> (or resume=<run dir>)")
        return Path(run_dir)
    path = Path(str(resume))
    if (path / "trainer_state.pt").is_file():  # a checkpoint: run_dir/checkpoints/step_N
        return path.parent.parent
    if (path / CONFIG_FILE).is_file() or (path / "checkpoints").is_dir():
        return path
    raise ConfigError(f"resume={path}: not a run directory or a checkpoint directory")


def resumed_config(given: dict, named: Iterable[str] | None, baseline: Callable[[], dict] | None) -> dict | None:
    """The config a resumed run continues with: its saved `config.yaml`, updated with the given keys.

    `named` holds the keys the user gave (overrides, a dict's keys); None means `given` is a complete config and
    every key counts as given. A key also counts as given when its value differs from `baseline()` (what the
    defaults compose to: a group override such as `algorithm=dapo` changes many keys). A given key that differs
    from the saved value must be in `SAFE_ON_RESUME`; otherwise the resume is refused, naming every such key
    with both values. Returns None when `given` does not resume a run that saved its config.
    """
    run_dir = resumed_run_dir(given.get("run_dir"), given.get("resume"))
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        return None
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
    named = None if named is None else set(named)
    base = baseline() if named is not None and baseline is not None else None

    def given_explicitly(key: str) -> bool:
        if named is None or key in named or any(n.startswith(key + ".") for n in named):
            return True
        return base is not None and _get(given, key) != _get(base, key)

    effective, refused = _copy(saved), []
    for key in _WHERE:
        effective[key] = given.get(key)
    for key in schema_keys():
        if key in _WHERE or not given_explicitly(key):
            continue
        old, new = _get(saved, key), _get(given, key)
        if old == new:
            continue
        if key in SAFE_ON_RESUME:
            _set(effective, key, new)
        else:
            refused.append(f"{key} (saved {old!r}, given {new!r})")
    if refused:
        raise ConfigError(
            f"resume: {run_dir} continues with its own config ({run_dir / CONFIG_FILE}); refused to change "
            f"{', '.join(refused)}. A resumed run may change only {', '.join(SAFE_ON_RESUME)}; start a new run "
            f"(another run_dir) to change the others"
        )
    return effective


def changed_on_resume(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """`key old -> new` for each key of `cfg` that differs from the run's saved config (safe keys only by now)."""
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return []
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    now = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return [
        f"{key} {_get(saved, key)!r} -> {_get(now, key)!r}"
        for key in schema_keys()
        if key not in _WHERE and _get(saved, key) != _get(now, key)
    ]


def check_unused(run_dir: Path) -> None:
    """Refuse to start a fresh run in a directory that already holds files (a run's, or anything else)."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:4])
        raise ConfigError(
            f"run_dir={run_dir}: the directory is already used ({held}, ...); continue that run with "
            f"run_dir={run_dir} resume=true, or start a new one in another run_dir"
        )


def write_json(path: Path, record: dict) -> None:
    """Write `record` to `path` under a temporary name and rename it, so a reader never sees half of it."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(record, indent=2))
    os.replace(staging, path)


def default_run_dir(cfg: TrainConfig) -> Path:
    """`run_dir` when given; in a Hydra sweep (`-m`) the job's own directory; else `runs/<date_time>`."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return Path(hydra_cfg.runtime.output_dir)
    except (ImportError, ValueError):  # ValueError: no Hydra app is running
        pass
    return Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S")


def resume_target(cfg: TrainConfig) -> Path | None:
    """The run directory `resume=<path>` names (a run or one of its checkpoints), else None."""
    if cfg.resume in (True, "true", "True"):
        return None
    return resumed_run_dir(cfg.run_dir, cfg.resume)


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint directory a run continues from, or None for a fresh start."""
    from tinyrl.checkpoint import latest_checkpoint  # imports torch: only when a run starts

    if not resuming(cfg.resume):
        return None
    path = Path(str(cfg.resume))
    if cfg.resume not in (True, "true", "True") and (path / "trainer_state.pt").is_file():
        return path
    found = latest_checkpoint(run_dir)
    if found is None:
        log.warning("resume: no RL checkpoint in %s yet; RL will start from its first step", run_dir)
        rewind_metrics(run_dir, 0)
    return found


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _copy(tree: Any) -> Any:
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
