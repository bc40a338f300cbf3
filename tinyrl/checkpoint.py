"""Crash-safe checkpoints: Hugging Face weights per model, trainer state, RNG streams; atomic rename; pruning.

Layout of one checkpoint:

    run_dir/checkpoints/step_00000040/
        actor/            config.json, model.safetensors, tokenizer files (loadable by from_pretrained / vLLM)
        critic/           (when the run has one)
        optimizer/        every optimizer's state, as each rank's shard (torch.distributed.checkpoint)
        trainer_state.pt  scheduler state, RNG states, sampler position, step, metrics offset...
        COMPLETE          written last; a directory without it is never loaded

Everything is written into a temporary directory beside the final one, fsynced, then renamed into place, so a
crash at any moment leaves either the previous checkpoint set or the new one, never a half-written checkpoint
that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "TRAINER_STATE",
    "save_checkpoint",
    "begin_checkpoint",
    "commit_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "checkpoint_step",
    "load_checkpoint_state",
    "capture_rng",
    "restore_rng",
]

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
_FINAL_NAME = re.compile(r"^step_(\d{8,})$")
_TEMP_NAME = re.compile(r"^\.tmp-step_(\d{8,})-(\d+)(-replaced)?$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_writer_temps(ckpt_root: Path) -> list[tuple[Path, re.Match[str]]]:
    """Temporary directories whose writer process is gone (ours count as gone: we are not writing them now)."""
    found = []
    for entry in sorted(ckpt_root.iterdir()):
        match = _TEMP_NAME.match(entry.name)
        if match and entry.is_dir():
            pid = int(match.group(2))
            if pid == os.getpid() or not _pid_alive(pid):
                found.append((entry, match))
    return found


def _restore_replaced(ckpt_root: Path) -> None:
    """Move back a complete checkpoint that was set aside for a new save of the same step that never landed."""
    for entry, match in _dead_writer_temps(ckpt_root):
        final = ckpt_root / f"step_{match.group(1)}"
        if match.group(3) and not final.exists() and (entry / COMPLETE_MARKER).is_file():
            os.replace(entry, final)


def _remove_stale_temps(ckpt_root: Path) -> None:
    """Delete half-written temporary directories of writers that died mid-save."""
    _restore_replaced(ckpt_root)
    for entry, _ in _dead_writer_temps(ckpt_root):
        shutil.rmtree(entry, ignore_errors=True)


def checkpoint_step(ckpt_dir: str | os.PathLike) -> int:
    """The step encoded in a checkpoint directory name (`step_00000040` -> 40)."""
    match = _FINAL_NAME.match(Path(ckpt_dir).name)
    if not match:
        raise ValueError(f"{ckpt_dir} is not a checkpoint directory (expected a name like step_00000040)")
    return int(match.group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first. Temporary and unmarked directories are left out."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    _restore_replaced(root)
    found = [
        entry
        for entry in root.iterdir()
        if _FINAL_NAME.match(entry.name) and entry.is_dir() and (entry / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    models: Mapping[str, PreTrainedModel],
    tokenizer: Any,
    state: dict[str, Any],
    keep_last: int = 2,
    tokenizer_into: str = "actor",
) -> Path:
    """Write `run_dir/checkpoints/step_{step:08d}` atomically and prune older complete checkpoints.

    Each entry of `models` is saved with `save_pretrained` (safetensors) into a subdirectory of its name; the
    tokenizer goes into `tokenizer_into` (default "actor", or the only model) so that directory alone loads
    with `from_pretrained` and vLLM. `state` is saved with `torch.save` as trainer_state.pt. Afterwards
    `keep_last` complete checkpoints remain: the one just written and the newest (by step) of the others.
    Returns its path.

    In two parts, for writers that add files of their own in between (e.g. every rank's optimizer shards):
    `staging = begin_checkpoint(run_dir, step)`, write into `staging`, then `commit_checkpoint(...)`.
    """
    _check_checkpoint_args(step, keep_last, models, state, tokenizer, tokenizer_into)
    staging = begin_checkpoint(run_dir, step)
    return commit_checkpoint(run_dir, step, staging, models, tokenizer, state, keep_last, tokenizer_into)


def _check_checkpoint_args(
    step: int, keep_last: int, models: Mapping[str, Any], state: Any, tokenizer: Any, tokenizer_into: str
) -> str:
    """Raise on a bad argument; return the model directory the tokenizer goes into."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be an int >= 1, got {keep_last!r}")
    if not models:
        raise ValueError("save_checkpoint: models is empty; pass at least {'actor': policy_model}")
    for name, model in models.items():
        if not isinstance(name, str) or not _MODEL_NAME.match(name) or name == COMPLETE_MARKER:
            raise ValueError(f"save_checkpoint: model name {name!r} is not a valid directory name")
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"save_checkpoint: models[{name!r}] ({type(model).__name__}) has no save_pretrained")
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    if tokenizer is not None:
        if len(models) == 1 and tokenizer_into not in models:
            tokenizer_into = next(iter(models))
        if tokenizer_into not in models:
            raise ValueError(
                f"save_checkpoint: tokenizer_into={tokenizer_into!r} is not one of the models {sorted(models)}"
            )
    return tokenizer_into


def begin_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """Clear what dead writers left and create the temporary directory the checkpoint of `step` is written in."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def commit_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tmp: Path,
    models: Mapping[str, PreTrainedModel],
    tokenizer: Any,
    state: dict[str, Any],
    keep_last: int = 2,
    tokenizer_into: str = "actor",
) -> Path:
    """Add models, tokenizer and state to `tmp` (from `begin_checkpoint`), mark it complete, rename it into
    place and prune; see `save_checkpoint`. On any error `tmp` is removed and nothing else changes."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step_{step:08d}"
    try:
        tokenizer_into = _check_checkpoint_args(step, keep_last, models, state, tokenizer, tokenizer_into)
        for name, model in models.items():
            model.save_pretrained(tmp / name)
            if not any((tmp / name).glob("*.safetensors")):
                raise RuntimeError(f"save_checkpoint: models[{name!r}] was not saved as safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / tokenizer_into)
        torch.save(state, tmp / TRAINER_STATE)
        _fsync_tree(tmp)
        marker = {"step": step, "models": sorted(models)}
        with open(tmp / COMPLETE_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)

        replaced = None
        if final.exists():
            # The same step saved again (e.g. a signal arrived right after a scheduled save): move the old
            # one aside first, since a directory cannot be renamed over a non-empty one.
            replaced = root / f".tmp-step_{step:08d}-{os.getpid()}-replaced"
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync_path(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    others = [path for path in list_checkpoints(run_dir) if path != final]
    for old in others[: max(len(others) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The trainer state dict of a complete checkpoint (tensors on CPU)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"load_checkpoint_state: checkpoint directory {ckpt_dir} does not exist")
    if not (ckpt_dir / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"load_checkpoint_state: {ckpt_dir} has no {COMPLETE_MARKER} marker; it was not fully written "
            f"(use latest_checkpoint() to find the newest complete one)"
        )
    path = ckpt_dir / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint_state: {path} is missing")
    # weights_only=False: our own file, holding RNG states and plain Python objects next to tensors.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint_state: {path} holds a {type(state).__name__}, expected a dict")
    return state


def capture_rng() -> dict[str, Any]:
    """The state of every global random stream: Python, NumPy, torch CPU and (when present) all CUDA devices."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back the random streams saved by `capture_rng`."""
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise KeyError(f"restore_rng: RNG state has no {key!r} entry (keys: {sorted(state)})")
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) != torch.cuda.device_count():
            raise ValueError(
                f"restore_rng: the checkpoint holds RNG states for {len(saved)} CUDA devices, "
                f"this process sees {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(saved)
