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

from tinyrl.config import register_configs

CONFIG_PATH = "pkg://tinyrl.conf"


def _print_summary(summary: dict) -> None:
    keys = ["accuracy_before_rl", "accuracy_after_rl", "eval_problems", "rl_steps", "wall_seconds", "run_dir"]
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    for line in summary_lines(summary):
        print(line)


def summary_lines(summary: dict) -> list[str]:
    """What a run did, in plain words: accuracy before -> after RL, the baseline if measured, the run directory."""
    if "accuracy_after_rl" not in summary:
        return [summary.get("message", "")]
    before, after = summary["accuracy_before_rl"], summary["accuracy_after_rl"]
    start = "after distillation" if "sft_steps" in summary else "before RL"
    lines = [
        f"Greedy accuracy on {summary.get('eval_problems', '?')} held-out problems: {before:.3f} {start} -> "
        f"{after:.3f} after {summary.get('rl_steps', 0)} RL steps ({100 * (after - before):+.1f} points), "
        f"{summary.get('wall_seconds', 0.0):.0f} s."
    ]
    baseline = summary.get("baseline")
    if baseline:
        lines.append(
            f"Best distillation-only baseline in the RL phase's time ({baseline['best']}): "
            f"{baseline['best_accuracy']:.3f}; RL is {100 * baseline['rl_gain_over_best']:+.1f} points over it."
        )
    lines.append(f"Results in {summary.get('run_dir', '?')}/ (summary.json, curves.png, samples.md)")
    return lines


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=None)
def _train(cfg: DictConfig) -> float:
    from tinyrl.experiment import train

    summary = train(cfg)
    _print_summary(summary)
    return float(summary.get("accuracy_after_rl", 0.0))


@hydra.main(config_path=CONFIG_PATH, config_name="sft", version_base=None)
def _sft(cfg: DictConfig) -> float:
    from tinyrl.experiment import train

    summary = train(cfg)
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
