"""Command-line entry points: `tinyrl-train`, `tinyrl-sft`, `tinyrl-eval`, `tinyrl-data`, `tinyrl-plot`, `tinyrl-tasks`,
`tinyrl-plan`.

The first four are Hydra apps over the config tree shipped in `tinyrl.conf`, so they work from any directory,
accept `key=value` overrides and `-m` sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from tinyrl.config import ConfigError, register_configs

CONFIG_PATH = "pkg://tinyrl.conf"


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def _quiet_hydra_on_other_ranks() -> None:
    """Under torchrun every rank runs the Hydra app; only rank 0 may create the run's output directory (the
    others would make their own, named by their own clock) and log files."""
    if _rank() > 0:
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def _print_summary(summary: dict) -> None:
    if _rank() > 0:
        return
    keys = ["accuracy_before_rl", "accuracy_after_rl", "eval_problems", "rl_steps", "wall_seconds", "run_dir"]
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))


def _run_training(cfg: DictConfig, prog: str) -> dict:
    """Run the experiment; a bad config value or failing rewards end the command with a one-line message."""
    from tinyrl.experiment import train
    from tinyrl.reward_report import RewardsFailed

    try:
        return train(cfg)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(2)
    except RewardsFailed as failure:  # the errors themselves were printed as they happened
        print(f"{prog}: {failure}", file=sys.stderr)
        sys.exit(1)


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=None)
def _train(cfg: DictConfig) -> float:
    summary = _run_training(cfg, "tinyrl-train")
    _print_summary(summary)
    return float(summary.get("accuracy_after_rl", 0.0))


@hydra.main(config_path=CONFIG_PATH, config_name="sft", version_base=None)
def _sft(cfg: DictConfig) -> float:
    summary = _run_training(cfg, "tinyrl-sft")
    _print_summary(summary)
    return float(summary.get("accuracy_after_rl", 0.0))


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base=None)
def _eval(cfg: DictConfig) -> float:
    from tinyrl.eval_checkpoint import evaluate_checkpoint

    result = evaluate_checkpoint(cfg)
    print(json.dumps(result, indent=2))
    return float(result["accuracy"])


@hydra.main(config_path=CONFIG_PATH, config_name="data", version_base=None)
def _data(cfg: DictConfig) -> None:
    from tinyrl.data import export_from_config

    for path in export_from_config(cfg):
        print(path)


def train_main() -> None:
    register_configs()
    _quiet_hydra_on_other_ranks()
    try:
        _train()
    except KeyboardInterrupt as stop:
        print(f"tinyrl-train: {stop or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


def sft_main() -> None:
    register_configs()
    _quiet_hydra_on_other_ranks()
    _sft()


def eval_main() -> None:
    register_configs()
    _eval()


def data_main() -> None:
    _data()


def plot_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tinyrl-plot", description="Plot the learning curves of a run directory.")
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    from tinyrl.plots import plot_run

    print(plot_run(args.run_dir, args.out))


def tasks_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tinyrl-tasks",
        description="List the tasks that task.name= accepts by name: built-in ones and installed plugins "
        "(entry-point group tinyrl.tasks), with their constructor arguments (task.kwargs).",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    args = parser.parse_args(argv)
    from tinyrl.task import task_catalog

    catalog = task_catalog()
    if args.json:
        print(json.dumps(catalog, indent=2))
        return
    width = max(len(entry["name"]) for entry in catalog)
    for entry in catalog:
        print(f"{entry['name']:<{width}}  {entry['source']}: {entry['description']}")
        print(f"{'':<{width}}  arguments: {entry['arguments'] or '(none)'}")


def plan_main(argv: list[str] | None = None) -> None:
    """`tinyrl-plan [--world-size N] [--gpu-gb G] [overrides...]`: per-GPU memory of a config, and whether it fits."""
    from tinyrl.plan import plan_main as main

    main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
