"""Multi-digit multiplication: give the exact product of two integers of the given digit counts.

TinyZero's second task (Pan et al., 2025): arithmetic a small model gets wrong until it learns to work digit by
digit. Rows: ``{"a": int, "b": int}`` with ``a`` of ``a_digits`` digits and ``b`` of ``b_digits`` digits.

Scores (``Multiplication.reward``) are always one of three values:

* ``correct_score`` (1.0): the last ``<answer>...</answer>`` holds exactly the product as a plain integer;
* ``format_score`` (0.1): an ``<answer>`` tag is present but its content is not that integer;
* ``0.0``: no ``<answer>`` tag, or the answer is the prompt's own example (``EXAMPLE_ANSWER``) and not the
  product: copying the example is not answering, so it earns no format bonus (a model that learned to copy it
  would otherwise collect the bonus on every problem without ever computing a product).

The verifier accepts only ASCII digits (surrounding whitespace allowed): no expressions, signs, decimal points,
digit separators, exponents, leading zeros or non-ASCII digits (Python's ``int`` would accept ``"٤٢"``, ``"4_2"``
and ``"４２"``; the verifier does not call it until the text is plain ASCII digits of bounded length). The last
``<answer>`` wins; an unclosed ``<answer>`` at the end counts as closed (engines may strip the stop string).
``Reward.info["reason"]`` says why (one of ``REASONS``).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import ClassVar

from tinyrl.task import SPLITS, Reward, TaskError, TooFewProblems, register_task
from tinyrl.tasks.countdown import extract_answer

__all__ = ["Multiplication", "check_product", "long_multiplication", "split_of", "REASONS", "EXAMPLE_ANSWER"]

EXAMPLE_ANSWER = "1234"  # the answer the prompt shows as the format's example

REASONS = (
    "correct",
    "no answer",
    "example copied",
    "empty answer",
    "answer too long",
    "expression",
    "sign",
    "decimal point",
    "digit separator",
    "non-ASCII digit",
    "disallowed character",
    "leading zero",
    "wrong product",
)

_DIGITS = re.compile(r"[0-9]+")  # an explicit class: \d would match every Unicode digit
_OPERATORS = set("*/x×·^()[]=")
_SEPARATORS = set(",_ '\u00a0\u2009\u202f")


def check_product(answer: str, product: int, max_chars: int) -> str:
    """The reason code for an answer's content: "correct" or why it is not exactly ``product`` (see REASONS)."""
    text = answer.strip()
    if not text:
        return "empty answer"
    if len(text) > max_chars:
        return "answer too long"
    if not _DIGITS.fullmatch(text):
        inner = text[1:] if text[0] in "+-" else text
        if text[0] in "+-" and _DIGITS.fullmatch(inner):
            return "sign"
        if any(ch in _OPERATORS for ch in text) or any(ch in "+-" for ch in inner):
            return "expression"
        if "." in text:
            return "decimal point"
        if any(ch.isdigit() and not ch.isascii() for ch in text):
            return "non-ASCII digit"
        unseparated = "".join(c for c in text if c not in _SEPARATORS)
        if unseparated != text and _DIGITS.fullmatch(unseparated):
            return "digit separator"
        return "disallowed character"
    if len(text) > 1 and text[0] == "0":
        return "leading zero"
    return "correct" if int(text) == product else "wrong product"


def long_multiplication(a: int, b: int) -> list[str]:
    """The steps of schoolbook multiplication: one partial product per non-zero digit of ``b``, then running sums.

    a * b = sum_k a * (d_k * 10^k) over the digits d_k of b.
    """
    partials = []
    for k, digit in enumerate(reversed(str(b))):
        if digit != "0":
            part = int(digit) * 10**k
            partials.append((part, a * part))
    if not partials:
        return [f"{a} * 0 = 0"]
    steps = [f"{a} * {part} = {value}" for part, value in partials]
    total = partials[0][1]
    for _, value in partials[1:]:
        steps.append(f"{total} + {value} = {total + value}")
        total += value
    return steps


_SPLIT_SHARES = (("train", 80), ("validation", 10), ("test", 10))
_SPLIT_OF_BUCKET = tuple(name for name, share in _SPLIT_SHARES for _ in range(share))
_ENUMERATE_UP_TO = 200_000  # problem spaces this small are listed whole (exact counts, no stalled draws)


def split_of(a: int, b: int) -> str:
    """A problem's split from a stable hash of the unordered pair, so splits never share a problem.

    bucket = blake2b(repr((min, max))) mod 100: train 0-79, validation 80-89, test 90-99.
    """
    key = repr((min(a, b), max(a, b))).encode()
    return _SPLIT_OF_BUCKET[int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % 100]


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


_CLOSE = "</answer>"


@register_task("multiplication")
@dataclass(frozen=True)
class Multiplication:
    """Multi-digit multiplication: the exact product of an a_digits-digit and a b_digits-digit integer.

    Rows: ``{"a": int, "b": int}``; teacher traces write out long multiplication for the warm start.
    """

    name: ClassVar[str] = "multiplication"
    stop: ClassVar[tuple[str, ...]] = (_CLOSE,)
    chat_prefix: ClassVar[str] = "<think>"
    ability: ClassVar[str] = "math"

    a_digits: int = 3
    b_digits: int = 2
    correct_score: float = 1.0
    format_score: float = 0.1
    prompt_style: str = "prose"  # prose: the User/Assistant template; compact: one short line (tiny CPU models)

    def __post_init__(self) -> None:
        for arg in ("a_digits", "b_digits"):
            v = getattr(self, arg)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 12:
                raise TaskError(f"Multiplication: {arg} must be an integer in [1, 12], got {v!r}", key=f"kwargs.{arg}")
        if self.prompt_style not in ("prose", "compact"):
            raise TaskError(f"Multiplication: prompt_style must be 'prose' or 'compact', got {self.prompt_style!r}",
                            key="kwargs.prompt_style")
        for arg in ("correct_score", "format_score"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TaskError(f"Multiplication: {arg} must be a finite number, got {v!r}", key=f"kwargs.{arg}")
            object.__setattr__(self, arg, float(v))

    @property
    def max_answer_chars(self) -> int:
        """Longer answers are not parsed: a product has at most a_digits + b_digits digits."""
        return 4 * (self.a_digits + self.b_digits) + 16

    # -- problems -----------------------------------------------------------------------------------------------

    def _ranges(self) -> tuple[range, range]:
        a, b = self.a_digits, self.b_digits
        return range(10 ** (a - 1), 10**a), range(10 ** (b - 1), 10**b)

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        """``size`` distinct problems of ``split``, deterministic for ``seed``; a size-n list is a prefix of n+1.

        a and b are uniform over their digit ranges; with equal digit counts, a*b and b*a are the same problem.
        """
        if split not in SPLITS:
            raise ValueError(f"Multiplication.dataset: split must be one of {SPLITS}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"Multiplication.dataset: size must be an integer >= 0, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Multiplication.dataset: seed must be an integer, got {seed!r}")
        rng = random.Random(_stable_int(f"multiplication|{self.a_digits}|{self.b_digits}|{split}|{seed}"))
        ra, rb = self._ranges()
        if len(ra) * len(rb) <= _ENUMERATE_UP_TO:
            pairs = [(a, b) for a in ra for b in rb if (self.a_digits != self.b_digits or a <= b)]
            pairs = [p for p in pairs if split_of(*p) == split]
            if size > len(pairs):
                raise self._too_many(split, size, f"only {len(pairs)}")
            rng.shuffle(pairs)
            out = []
            for a, b in pairs[:size]:
                if self.a_digits == self.b_digits and rng.random() < 0.5:
                    a, b = b, a
                out.append({"a": a, "b": b})
            return out
        rows, seen = [], set()
        for _ in range(100 * size + 10_000):
            if len(rows) == size:
                break
            a, b = rng.choice(ra), rng.choice(rb)
            key = (min(a, b), max(a, b))
            if key not in seen and split_of(a, b) == split:
                seen.add(key)
                rows.append({"a": a, "b": b})
        if len(rows) < size:
            raise self._too_many(split, size, f"random draws found only {len(rows)}")
        return rows

    def _too_many(self, split: str, size: int, available: str) -> TooFewProblems:
        return TooFewProblems(
            f"Multiplication.dataset: asked for {size} {split} problems but {available} distinct ones exist with "
            f"{self.a_digits}- and {self.b_digits}-digit factors; ask for fewer or use more digits"
        )

    # -- prompts ------------------------------------------------------------------------------------------------

    @staticmethod
    def _row(row: dict) -> tuple[int, int]:
        if not isinstance(row, dict) or "a" not in row or "b" not in row:
            raise ValueError(f"Multiplication: a row needs 'a' and 'b' keys, got {row!r}")
        a, b = row["a"], row["b"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (a, b)):
            raise ValueError(f"Multiplication: 'a' and 'b' must be integers >= 0, got {a!r} and {b!r}")
        return a, b

    def _question(self, row: dict) -> str:
        a, b = self._row(row)
        return (
            f"Compute {a} * {b}. Work it out step by step inside <think> </think>, then give only the product as a "
            f"plain integer inside <answer> </answer>, for example <answer>{EXAMPLE_ANSWER}</answer>."
        )

    def prompt(self, row: dict) -> str:
        """Base-model template in User/Assistant prose (or one short line), ending in an open <think> block."""
        if self.prompt_style == "compact":
            a, b = self._row(row)
            return f"Multiply {a} by {b}.\n{self.chat_prefix}"
        return (
            "The User asks for a product and the Assistant computes it: the Assistant works step by step inside "
            "<think> </think> and then gives the product inside <answer> </answer>.\n"
            f"User: {self._question(row)}\nAssistant: {self.chat_prefix}"
        )

    def messages(self, row: dict) -> list[dict]:
        """Chat form; the assistant turn then starts with ``chat_prefix``."""
        return [
            {"role": "system", "content": "You multiply integers exactly. Work step by step inside <think> </think>, "
             "then give only the product inside <answer> </answer>."},
            {"role": "user", "content": self._question(row)},
        ]

    # -- scoring ------------------------------------------------------------------------------------------------

    def reward(self, completion: str, row: dict) -> Reward:
        """Score from {0.0, format_score, correct_score}: the last <answer> must be the product, digits only.

        score = correct_score if answer == str(a * b) (ASCII digits, no leading zero), format_score if an
        <answer> tag is present, else 0: TinyZero's multiplication reward (Pan et al., 2025), strict about form;
        0 also for the prompt's example answer copied (unless it is the product).
        """
        if not isinstance(completion, str):
            raise TypeError(f"Multiplication.reward: completion must be str, got {type(completion).__name__}")
        a, b = self._row(row)
        answer = extract_answer(completion)
        if answer is None:
            return Reward(0.0, False, False, {"reason": "no answer"}, {"correct": 0.0, "format": 0.0})
        reason = check_product(answer, a * b, self.max_answer_chars)
        correct = reason == "correct"
        if not correct and answer.strip() == EXAMPLE_ANSWER:
            info = {"reason": "example copied", "answer": EXAMPLE_ANSWER}
            return Reward(0.0, False, False, info, {"correct": 0.0, "format": 0.0})
        score = self.correct_score if correct else self.format_score
        parts = {"correct": score if correct else 0.0, "format": 0.0 if correct else score}
        info = {"reason": reason, "answer": answer[: self.max_answer_chars].strip()}
        return Reward(score, correct, True, info, parts)

    # -- teacher ------------------------------------------------------------------------------------------------

    def demonstration(self, row: dict) -> str:
        """A teacher completion continuing ``prompt(row)``: long multiplication, then the product."""
        a, b = self._row(row)
        steps = "\n".join(long_multiplication(a, b))
        return f"\n{steps}\n</think>\n<answer>{a * b}</answer>"
