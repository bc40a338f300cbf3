"""Which training problems each step sees: a seeded reshuffle every epoch, and a position that checkpoints."""

from __future__ import annotations

import numpy as np


class PromptSampler:
    """Draws problem indices without replacement, epoch after epoch; `state_dict` makes a resumed run exact."""

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError("PromptSampler: the training split is empty")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.position == self.num_rows:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            step = min(count - len(out), self.num_rows - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + step])
            self.position += step
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint sampler was built for {state['num_rows']} rows with seed {state['seed']}, this run has "
                f"{self.num_rows} rows with seed {self.seed}: task.train_size, task.data_seed or seed changed"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
