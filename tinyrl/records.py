"""What an RL run keeps in its directory, the same for `tinyrl-train` and for research code's own loop.

- `config.yaml`: the config it ran; a used directory is refused first, as `tinyrl-train` refuses it (a resumed run
  and `tinyrl.experiment.train` prepare the directory themselves);
- `metrics.jsonl`: one row per step (rank 0; `tinyrl.metrics.MetricsWriter`, with its TensorBoard/W&B sinks);
- `samples.jsonl`, `samples.md`: example completions every `trainer.samples_every` steps and at the last step
  (`close` writes the latest step's, in one process, when a run stops before the schedule fell on it);
- `curves.png` when the run closes (`logging.plot`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tinyrl.config import ConfigError, TrainConfig
from tinyrl.metrics import METRICS_FILE, MetricsWriter, NullWriter, read_metrics, write_samples
from tinyrl.rundir import CONFIG_FILE, check_unused


class RunRecords:
    """The records of one run in `run_dir`, kept by rank 0 (`world`: the trainer's `World`).

    `fresh`: refuse a used directory and write the config there. Samples arrive as `(prompt index, completion,
    reward)` items from every rank; `prompt_text(index)` renders a prompt for a person.
    """

    def __init__(self, run_dir: str | Path, cfg: TrainConfig, world: Any, prompt_text: Callable[[int], str], *,
                 fresh: bool) -> None:
        self.run_dir, self.cfg, self.world, self.prompt_text = Path(run_dir), cfg, world, prompt_text
        if fresh:
            start_run_dir(self.run_dir, cfg, world)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = cfg.logging
        self.metrics = MetricsWriter(self.run_dir, log.tensorboard, log.wandb) if world.is_main else NullWriter()
        self._unwritten: tuple[int, list] | None = None  # the latest step's samples, when the schedule skipped it

    def own_file(self, name: str) -> Path:
        """`run_dir/name` on rank 0, `run_dir/<stem>.rank<R><suffix>` on rank R: for what every rank keeps."""
        path = self.run_dir / name
        return path if self.world.is_main else path.with_name(f"{path.stem}.rank{self.world.rank}{path.suffix}")

    def samples(self, step: int, scored: Sequence[tuple]) -> None:
        """A step's example completions: written when `trainer.samples_every` falls on the step or it is the run's
        last (collective), else kept for `close`."""
        every = self.cfg.trainer.samples_every
        if not every:
            return
        self._unwritten = None
        if step % every == 0 or step == self.cfg.trainer.steps:
            self._write_samples(step, scored)
        else:
            self._unwritten = (step, list(scored))

    def _write_samples(self, step: int, scored: Sequence[tuple]) -> None:
        """Example completions of a step, with reward-hacking signals computed over every rank's completions."""
        everything = self.world.concat(list(scored))
        if not self.world.is_main:
            return
        write_samples(
            self.run_dir, step, [self.prompt_text(i) for i, _, _ in everything], [c.text for _, c, _ in everything],
            [r for _, _, r in everything], response_lengths=[len(c.token_ids) for _, c, _ in everything],
        )

    def close(self) -> None:
        """The latest step's samples if the schedule skipped them (one process only: no collective here, as
        `close` may run after another rank failed), `curves.png` (rank 0, `logging.plot`), the metrics sinks."""
        if self._unwritten is not None and not self.world.sharded:
            self._write_samples(*self._unwritten)
        self._unwritten = None
        self.metrics.close()
        if self.cfg.logging.plot and self.world.is_main and (self.run_dir / METRICS_FILE).is_file():
            if read_metrics(self.run_dir):
                from tinyrl.plots import plot_run

                plot_run(self.run_dir)


def start_run_dir(run_dir: Path, cfg: TrainConfig, world: Any) -> None:
    """Refuse a used run directory, as `tinyrl-train` does, and keep the config there (rank 0 decides for every
    rank; collective)."""
    problem = None
    if world.is_main:
        try:
            check_unused(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        except ConfigError as err:
            problem = str(err)
    problem = world.broadcast(problem)
    if problem is not None:
        raise ConfigError(problem)
