"""A task's problem sets on disk, in the row schema TinyZero and veRL use (parquet or JSONL).

One row per problem::

    {"data_source": "countdown",
     "prompt": [{"role": "system", "content": ...}, {"role": "user", "content": ...}],
     "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": {"numbers": [...], "target": 50}},
     "extra_info": {"split": "train", "index": 0}}

``ground_truth`` holds the task's own row, so ``from_verl_rows`` gives back exactly what ``task.dataset`` made,
and files written by TinyZero's Countdown preprocessing read back as Countdown rows. Standard library only at
import time; pyarrow is imported by the parquet functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinyrl.task import SPLITS, Task, TaskError, TaskFileNotFound, get_task

__all__ = [
    "FORMATS",
    "to_verl_rows",
    "from_verl_rows",
    "write_rows",
    "read_rows",
    "export_dataset",
    "export_from_config",
]

FORMATS = ("parquet", "jsonl")


def to_verl_rows(task: Task, rows: list[dict], split: str) -> list[dict]:
    """Task rows as TinyZero/veRL rows: chat-form prompt, the task row as ``reward_model.ground_truth``."""
    if not isinstance(split, str) or not split:
        raise ValueError(f"to_verl_rows: split must be a non-empty string, got {split!r}")
    ability = getattr(task, "ability", "reasoning")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"to_verl_rows: row {i} is {type(row).__name__}, not a dict")
        out.append(
            {
                "data_source": task.name,
                "prompt": task.messages(row),
                "ability": ability,
                "reward_model": {"style": "rule", "ground_truth": dict(row)},
                "extra_info": {"split": split, "index": i},
            }
        )
    return out


def from_verl_rows(rows: list[dict]) -> list[dict]:
    """Task rows back from TinyZero/veRL rows: each row's ``reward_model.ground_truth``.

    A ground truth that is not a dict (veRL math sets store the answer as a string) becomes
    ``{"ground_truth": value}``.
    """
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"from_verl_rows: row {i} is {type(row).__name__}, not a dict")
        reward_model = row.get("reward_model")
        if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
            raise ValueError(f"from_verl_rows: row {i} has no 'reward_model.ground_truth' (keys: {sorted(row)})")
        truth = reward_model["ground_truth"]
        out.append(dict(truth) if isinstance(truth, Mapping) else {"ground_truth": truth})
    return out


def _format_of(path: Path) -> str:
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise TaskError(f"{path}: unknown file type {path.suffix!r}; use .parquet or .jsonl")
    return fmt


def write_rows(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write rows to ``path`` (.parquet or .jsonl), atomically: a reader never sees half a file."""
    path = Path(path)
    fmt = _format_of(path)
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{path}: row {i} is {type(row).__name__}, not a dict")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if fmt == "jsonl":
            _write_jsonl(tmp, rows, path)
        else:
            _write_parquet(tmp, rows, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_jsonl(tmp: Path, rows: list[dict], path: Path) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            try:
                line = json.dumps(row, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}: row {i} cannot be written as JSON ({exc})") from exc
            f.write(line + "\n")


def _write_parquet(tmp: Path, rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"{path}: rows cannot be stored as parquet ({exc})") from exc
    pq.write_table(table, tmp)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows from a .parquet or .jsonl file. Errors are one line naming the file (and the line for JSONL):
    `TaskFileNotFound` (a FileNotFoundError) or `TaskError` (a ValueError)."""
    path = Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        raise TaskFileNotFound(f"{path}: no such file")
    if fmt == "jsonl":
        return _read_jsonl(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        detail = " ".join(str(exc).split())
        raise TaskError(f"{path}: not a readable parquet file ({detail})") from exc


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}: line {line_no}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                "each line must be one JSON object") from exc
            if not isinstance(row, dict):
                raise TaskError(f"{path}: line {line_no}: expected a JSON object ({{\"column\": value, ...}}), "
                                f"got {type(row).__name__}")
            rows.append(row)
    return rows


def _check_sizes(sizes: Any, where: str) -> dict[str, int]:
    if not isinstance(sizes, Mapping):
        raise ValueError(f"{where}: sizes must map split names to counts, got {sizes!r}")
    for split, size in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"{where}: sizes.{split} is not a split; use {', '.join(SPLITS)}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{where}: sizes.{split} must be an integer >= 0, got {size!r}")
    return {split: sizes[split] for split in SPLITS if split in sizes}


def export_dataset(
    task: Task, sizes: dict[str, int], seed: int, out_dir: str | os.PathLike, fmt: str = "parquet"
) -> list[Path]:
    """Write ``{out_dir}/{split}.{fmt}`` for each split with a non-zero size; returns the paths written."""
    sizes = _check_sizes(sizes, "export_dataset")
    if fmt not in FORMATS:
        raise ValueError(f"export_dataset: fmt must be one of {FORMATS}, got {fmt!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"export_dataset: seed must be an integer, got {seed!r}")
    out = Path(out_dir)
    paths = []
    for split, size in sizes.items():
        if size == 0:
            continue
        rows = task.dataset(split, size, seed)
        paths.append(write_rows(out / f"{split}.{fmt}", to_verl_rows(task, rows, split)))
    return paths


_CONFIG_KEYS = ("task", "sizes", "seed", "out_dir", "format")


def _plain_config(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import DictConfig, OmegaConf  # hydra-core's config library; only needed for DictConfig input

    if isinstance(cfg, DictConfig):  # the hydra node (help texts, run settings) is not the export's
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ValueError(f"data config must be a mapping, got {type(cfg).__name__}")


def export_from_config(cfg: Any) -> list[Path]:
    """Run the export described by a ``conf/data.yaml``-shaped config (dict or OmegaConf DictConfig).

    Keys: ``task.name``, ``task.kwargs``, ``sizes`` (train/validation/test), ``seed``, ``out_dir``, ``format``.
    Every key is checked before any problem is generated.
    """
    cfg = _plain_config(cfg)
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"data config: missing key(s) {', '.join(missing)}")
    unknown = sorted(k for k in cfg if k not in _CONFIG_KEYS and k not in ("hydra", "defaults"))
    if unknown:
        raise ValueError(f"data config: unknown key(s) {', '.join(unknown)}; expected {', '.join(_CONFIG_KEYS)}")
    task_cfg = cfg["task"]
    if not isinstance(task_cfg, Mapping) or not isinstance(task_cfg.get("name"), str) or not task_cfg["name"]:
        raise ValueError(f"data config: task.name must be a task name or spec, got {task_cfg!r}")
    kwargs = task_cfg.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"data config: task.kwargs must be a mapping, got {kwargs!r}")
    sizes = _check_sizes(cfg["sizes"], "data config")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise ValueError(f"data config: seed must be an integer, got {cfg['seed']!r}")
    if not isinstance(cfg["out_dir"], str) or not cfg["out_dir"]:
        raise ValueError(f"data config: out_dir must be a directory path, got {cfg['out_dir']!r}")
    if cfg["format"] not in FORMATS:
        raise ValueError(f"data config: format must be one of {FORMATS}, got {cfg['format']!r}")
    task = get_task(task_cfg["name"], **kwargs)
    return export_dataset(task, sizes, cfg["seed"], cfg["out_dir"], cfg["format"])
