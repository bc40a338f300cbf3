"""Run directories: where a run writes, and which checkpoint a resumed run continues from."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tinyrl.checkpoint import latest_checkpoint
from tinyrl.config import TrainConfig
from tinyrl.metrics import rewind_metrics

log = logging.getLogger("tinyrl")


def default_run_dir(cfg: TrainConfig) -> Path:
    """`run_dir` when given, else Hydra's output directory, else `runs/<date_time>` (plain Python use)."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path("runs") / time.strftime("%Y-%m-%d_%H-%M-%S")


def resume_target(cfg: TrainConfig) -> Path | None:
    """The run directory `resume=<path>` names, when it names a run directory rather than a checkpoint."""
    if cfg.resume in (False, None, "false", True, "true"):
        return None
    path = Path(str(cfg.resume))
    return path if (path / "checkpoints").is_dir() else None


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint directory a run continues from, or None for a fresh start."""
    if cfg.resume is False or cfg.resume is None or cfg.resume == "false":
        return None
    if cfg.resume is True or cfg.resume == "true":
        found = latest_checkpoint(run_dir)
        if found is None:
            if not cfg.run_dir:
                raise ValueError("resume=true needs run_dir=<the run to resume> (or resume=<run dir>)")
            log.warning("resume=true: no complete checkpoint in %s yet; starting RL from its first step", run_dir)
            rewind_metrics(run_dir, 0)
        return found
    path = Path(str(cfg.resume))
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"resume={path}: no complete checkpoint under {path}/checkpoints")
        return found
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"resume={path}: not a run directory or a checkpoint directory")
    return path
