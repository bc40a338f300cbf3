"""Command-line entry points: `tinyrl-train`, `tinyrl-sft`, `tinyrl-eval`, `tinyrl-data`, `tinyrl-plot`.

The first four are Hydra apps over the config tree shipped in `tinyrl.conf`, so they work from any directory,
accept `key=value` overrides and `-m` sweeps.
"""

from __future__ import annotations

import argparse
import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from tinyrl.config import ConfigError, register_configs

CONFIG_PATH = "pkg://tinyrl.conf"


def _print_summary(summary: dict) -> None:
    keys = ["accuracy_before_rl", "accuracy_after_rl", "eval_problems", "rl_steps", "wall_seconds", "run_dir"]
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))


def _train_reporting_config_errors(cfg: DictConfig, prog: str) -> dict:
    """Run the experiment; a bad config value ends the command with its one-line message, no traceback."""
    from tinyrl.experiment import train

    try:
        return train(cfg)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=None)
def _train(cfg: DictConfig) -> float:
    summary = _train_reporting_config_errors(cfg, "tinyrl-train")
    _print_summary(summary)
    return float(summary.get("accuracy_after_rl", 0.0))


@hydra.main(config_path=CONFIG_PATH, config_name="sft", version_base=None)
def _sft(cfg: DictConfig) -> float:
    summary = _train_reporting_config_errors(cfg, "tinyrl-sft")
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
    try:
        _train()
    except KeyboardInterrupt as stop:
        print(f"tinyrl-train: {stop or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


def sft_main() -> None:
    register_configs()
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


if __name__ == "__main__":
    sys.exit(train_main())
