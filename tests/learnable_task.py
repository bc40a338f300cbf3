"""A trivially learnable task for trainer tests: the reward is the share of digits in the completion.

A randomly initialised tiny model writes few digits; any policy-gradient method that works raises the share
within a few dozen updates. Loaded by path (`tests/learnable_task.py:DigitTask`) like a user's own task file.
"""

from tinyrl.task import Reward


class DigitTask:
    name = "digits"
    stop = ()
    chat_prefix = ""

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        offset = {"train": 0, "validation": 10_000, "test": 20_000}[split]
        return [{"id": offset + seed * 100_000 + i} for i in range(size)]

    def prompt(self, row: dict) -> str:
        return f"Problem {row['id'] % 97}: say digits.\n"

    def messages(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": self.prompt(row)}]

    def reward(self, completion: str, row: dict) -> Reward:
        share = sum(ch.isdigit() for ch in completion) / max(1, len(completion))
        return Reward(score=share, correct=share >= 0.5, formatted=bool(completion), info={})

    def demonstration(self, row: dict) -> str:
        return "12345 67890"


class HalfConstantTask(DigitTask):
    """Even problems always score 0.5 (no learning signal); odd ones score a hash of the text (almost never tied)."""

    def reward(self, completion: str, row: dict) -> Reward:
        if row["id"] % 2 == 0:
            return Reward(score=0.5, correct=False, formatted=True, info={})
        return Reward(score=(sum(map(ord, completion)) % 997) / 997, correct=False, formatted=True, info={})


class _Echo:
    """Writes "77" into the completion after every third policy token (counted over the whole completion)."""

    triggers = "".join(chr(c) for c in range(32, 127)) + "\n"

    def __call__(self, prompt: str, text: str):
        return "77" if len(text) % 3 == 0 and not text.endswith("77") else None


class DigitTaskWithEnvironment(DigitTask):
    """DigitTask whose environment writes digits into completions: those tokens must never enter the loss."""

    feedback = _Echo()
