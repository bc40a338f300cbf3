"""A custom task in one file: put the letters of a word in alphabetical order.

Everything tinyrl needs from a task is here: seeded problem sets with disjoint splits, a base prompt and a chat
form, a verifier, and a teacher demonstration for the supervised warm start. Only `dataset`, `prompt` (or
`messages`) and `reward` are required; `name`, `stop` and `chat_prefix` have defaults (the class name in snake
case, no stop strings, no prefix), set here because this task's answers end at </answer> and its chat turn opens
a <think> block.

    python examples/custom_task.py                       # a few problems and scored sample completions
    tinyrl-data task.name=examples/custom_task.py:SortLetters out_dir=data/sort_letters
    tinyrl-train task=custom task.name=examples/custom_task.py:SortLetters

Scores: 1.0 for the sorted letters in the last <answer> tag, 0.1 for a tag holding anything else, 0.0 without one.
"""

from __future__ import annotations

import hashlib
import random
import string

from tinyrl.task import SPLITS, Reward, register_task


def split_of(word: str) -> str:
    """A stable hash decides each word's split (80/10/10), so splits never share a word."""
    bucket = hashlib.blake2b(word.encode(), digest_size=8).digest()[0] % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


@register_task("sort_letters")
class SortLetters:
    name = "sort_letters"
    stop = ("</answer>",)
    chat_prefix = "<think>"
    ability = "puzzle"

    def __init__(
        self, min_letters: int = 4, max_letters: int = 8, correct_score: float = 1.0, format_score: float = 0.1
    ):
        if not all(isinstance(n, int) for n in (min_letters, max_letters)) or not 2 <= min_letters <= max_letters <= 20:
            raise ValueError(
                f"SortLetters: need 2 <= min_letters <= max_letters <= 20, got {min_letters} and {max_letters}"
            )
        self.min_letters, self.max_letters = min_letters, max_letters
        self.correct_score, self.format_score = float(correct_score), float(format_score)

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"SortLetters.dataset: split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"sort_letters|{split}|{seed}")  # string seeds are hashed with SHA-512: stable
        rows: list[dict] = []
        seen: set[str] = set()
        for _ in range(100 * size + 10_000):
            if len(rows) == size:
                return rows
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(self.min_letters, self.max_letters)))
            if word not in seen and split_of(word) == split:
                seen.add(word)
                rows.append({"letters": word})
        if len(rows) == size:
            return rows
        raise ValueError(f"SortLetters.dataset: found only {len(rows)} distinct {split} words; ask for fewer")

    def _question(self, row: dict) -> str:
        return (
            f'Write the letters of "{row["letters"]}" in alphabetical order, as one word with repeats kept. '
            "Think inside <think> </think>, then give only that word inside <answer> </answer>."
        )

    def prompt(self, row: dict) -> str:
        return f"User: {self._question(row)}\nAssistant: {self.chat_prefix}"

    def messages(self, row: dict) -> list[dict]:
        return [
            {"role": "system", "content": "You answer letter puzzles exactly."},
            {"role": "user", "content": self._question(row)},
        ]

    def reward(self, completion: str, row: dict) -> Reward:
        start = completion.rfind("<answer>")
        if start < 0:
            return Reward(0.0, False, False, {"reason": "no answer"}, {"correct": 0.0, "format": 0.0})
        start += len("<answer>")
        end = completion.find("</answer>", start)
        answer = completion[start : end if end >= 0 else start + 200].strip()
        correct = answer == "".join(sorted(row["letters"]))
        score = self.correct_score if correct else self.format_score
        parts = {"correct": score if correct else 0.0, "format": 0.0 if correct else score}  # logged as reward/<name>
        return Reward(score, correct, True, {"reason": "correct" if correct else "wrong order"}, parts)

    def demonstration(self, row: dict) -> str:
        ordered = sorted(row["letters"])
        return (
            f"\nLetters: {' '.join(row['letters'])}. In order: {' '.join(ordered)}.\n"
            f"</think>\n<answer>{''.join(ordered)}</answer>"
        )


if __name__ == "__main__":  # the guard matters: reward workers are spawned and re-import this file
    from tinyrl.reward_workers import score_batch

    task = SortLetters()
    rows = task.dataset("test", 3, seed=0)
    completions = [task.demonstration(rows[0]), "<answer>zyx</answer>", "I would rather not say."]
    for row, completion, reward in zip(rows, completions, score_batch(task, completions, rows, workers=2)):
        print(task.prompt(row) + completion)
        print(f"-> score {reward.score} correct={reward.correct} ({reward.info['reason']})\n")
