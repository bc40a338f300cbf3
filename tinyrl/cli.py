"""Command-line entry points: `tinyrl-train`, `tinyrl-sft`, `tinyrl-eval`, `tinyrl-data`, `tinyrl-plot`, `tinyrl-tasks`,
`tinyrl-plan`.

The first four compose the config tree shipped in `tinyrl.conf`, so they work from any directory and accept
`key=value` overrides. A plain command composes with `tinyrl.load_config`, exactly as Python code does; Hydra's
own command line (`-m` sweeps, `--help`, `--cfg job`, `--config-dir ...`) runs through `hydra.main`. A config that
cannot work is one line on stderr and exit status 2, before any model loads and without a run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import hydra
from omegaconf import DictConfig

from tinyrl.config import ConfigError, register_configs
from tinyrl.task import TaskError

CONFIG_PATH = "pkg://tinyrl.conf"
CONFIG_ERROR_STATUS = 2


@contextmanager
def _reported(prog: str) -> Iterator[None]:
    """A ConfigError or a TaskError (a task or its data that cannot work) becomes one line and exit status 2;
    Ctrl-C or SIGTERM says what was kept, status 130; a run stopped because its rewards kept failing, status 1 (its
    errors were printed as they happened) or its rollout engine died or hung, one line and status 1."""
    try:
        yield
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_STATUS)
    except TaskError as err:
        print(f"{prog}: {err.config_line()}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_STATUS)
    except KeyboardInterrupt as stop:
        print(f"{prog}: {stop or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        from tinyrl.reward_report import RewardsFailed  # imports torch: only once a run has started
        from tinyrl.rollout import EngineFailed

        if isinstance(err, RewardsFailed):  # the errors themselves were printed as they happened
            print(f"{prog}: {err}", file=sys.stderr)
            sys.exit(1)
        if any(isinstance(e, EngineFailed) for e in _causes(err)):  # a dead or hung engine: what and where, no trace
            print(f"{prog}: {err}", file=sys.stderr)
            sys.exit(1)
        raise


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    while err is not None:
        yield err
        err = err.__cause__


def _dispatch(prog: str, hydra_app: Callable[[], object], run: Callable[[Sequence[str]], object],
              argv: Sequence[str] | None) -> None:
    if argv is not None:
        sys.argv[1:] = list(argv)  # hydra.main reads sys.argv
    argv = sys.argv[1:]
    register_configs()
    if any(arg.startswith("-") for arg in argv):
        with _reported(prog):
            hydra_app()
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tinyrl").setLevel(logging.INFO)
    with _reported(prog):
        run(argv)


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


# ---------------------------------------------------------------------------------------------- tinyrl-train / -sft
def _run_training(overrides: Sequence[str], config_name: str) -> None:
    from tinyrl.compose import load_config

    config = load_config(overrides, config_name)
    from tinyrl.distributed import shutdown_world
    from tinyrl.experiment import train

    train(config)
    shutdown_world()


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base=None)
def _train(cfg: DictConfig) -> float:
    from tinyrl.distributed import shutdown_world
    from tinyrl.experiment import train

    with _reported("tinyrl-train"):
        accuracy = train(cfg).get("accuracy_after_rl")
    shutdown_world()
    return float("nan") if accuracy is None else float(accuracy)  # a sweeper's objective


@hydra.main(config_path=CONFIG_PATH, config_name="sft", version_base=None)
def _sft(cfg: DictConfig) -> float:
    from tinyrl.distributed import shutdown_world
    from tinyrl.experiment import train

    with _reported("tinyrl-sft"):
        accuracy = train(cfg).get("accuracy_after_rl")
    shutdown_world()
    return float("nan") if accuracy is None else float(accuracy)


def train_main(argv: Sequence[str] | None = None) -> None:
    _dispatch("tinyrl-train", _train, lambda overrides: _run_training(overrides, "train"), argv)
    _end_rank_process()


def sft_main(argv: Sequence[str] | None = None) -> None:
    _dispatch("tinyrl-sft", _sft, lambda overrides: _run_training(overrides, "sft"), argv)
    _end_rank_process()


def _end_rank_process() -> None:
    if "WORLD_SIZE" in os.environ:  # torchrun's rank (imports torch; a plain run need not)
        from tinyrl.distributed import end_rank_process

        end_rank_process()


# ---------------------------------------------------------------------------------------------- tinyrl-eval
def _run_eval(cfg: DictConfig, overrides: Sequence[str]) -> None:
    from tinyrl.eval_checkpoint import evaluate_checkpoint

    result = evaluate_checkpoint(cfg, overrides)
    if result["settings_from"]:
        print(f"tinyrl-eval: task and generation settings from {result['settings_from']} (keys you give win)",
              file=sys.stderr)
    print(json.dumps(result, indent=2))


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base=None)
def _eval(cfg: DictConfig) -> None:
    with _reported("tinyrl-eval"):
        _run_eval(cfg, _hydra_overrides())


def eval_main(argv: Sequence[str] | None = None) -> None:
    from tinyrl.compose import compose

    _dispatch("tinyrl-eval", _eval, lambda overrides: _run_eval(compose("eval", overrides), overrides), argv)


# ---------------------------------------------------------------------------------------------- tinyrl-data
def _run_data(cfg: DictConfig) -> None:
    from tinyrl.data import export_from_config

    for path in export_from_config(cfg):
        print(path)


@hydra.main(config_path=CONFIG_PATH, config_name="data", version_base=None)
def _data(cfg: DictConfig) -> None:
    with _reported("tinyrl-data"):
        _run_data(cfg)


def data_main(argv: Sequence[str] | None = None) -> None:
    from tinyrl.compose import compose

    _dispatch("tinyrl-data", _data, lambda overrides: _run_data(compose("data", overrides)), argv)


# ---------------------------------------------------------------------------------------------- tinyrl-plot
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
