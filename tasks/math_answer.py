"""Free-form math answers over a user's file (GSM8K/MATH-style rows), checked for equivalence with math-verify.

The problems come from parquet/JSONL files like `tinyrl.file_task.FileTask` reads (veRL schema by default, or
plain columns); the ground truth is a string such as ``"72"``, ``"\\frac{1}{3}"``, a GSM8K answer ending in
``"#### 72"``, or a MATH solution ending in ``\\boxed{...}``. A completion's answer is its last ``\\boxed{...}``,
else what follows its last ``####`` on that line, else its last ``<answer>...</answer>``. Answer and ground truth
are compared by Hugging Face's math-verify (``pip install 'tinyrl[math]'``), so ``0.5`` equals ``\\frac{1}{2}``
and ``1,000`` equals ``1000``; a string comparison would call both wrong.

math-verify parses with sympy, which evaluates what it parses: ``2^{2^{100}}``, ``9!!!!!!`` or ``(1+x)^{100000}``
never finish, in C code that no Python timer interrupts. So the verifier bounds what reaches it: answers longer
than ``max_answer_chars``, nested deeper than ``max_nesting``, power towers, exponents above ``max_exponent``,
factorials of anything but a small integer, and big operators (sums, products, integrals, limits, binomials) are
refused as ``"unsafe expression"`` before parsing; and it runs inside the reward workers' wall-clock, CPU and
memory limits (its own signal-based timeouts are off, so they cannot cancel the workers' timer).

Scores: ``correct_score`` (1.0) for an equivalent answer, ``format_score`` (0.0) for any other answer found,
0.0 without one. ``Reward.info["reason"]`` is one of ``REASONS``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import Any, Sequence

from tinyrl.file_task import FileTask
from tinyrl.task import Reward, TaskError, register_task

__all__ = ["MathAnswer", "extract_final_answer", "unsafe_reason", "REASONS"]

REASONS = ("correct", "no answer", "empty answer", "answer too long", "unsafe expression", "unparsable", "wrong answer")

_BOXED = ("\\boxed", "\\fbox")
_BIG_OPERATORS = re.compile(
    r"\\(sum|prod|int|iint|oint|lim|binom|dbinom|tbinom|choose|coprod|bigcup|bigcap)(?![a-zA-Z])"
)
_POWER = re.compile(r"\^|\*\*")
_EXPONENT_TOKEN = re.compile(r"[-+]?\s*(\\[a-zA-Z]+|[0-9.]+|[a-zA-Z])")
_COMMAND = re.compile(r"\\[a-zA-Z]+(\{[^{}]*\})?")  # \frac, \pi, \text{...}: not variables
_VARIABLE = re.compile(r"[a-zA-Z]")
_FACTORIAL_OK = re.compile(r"(?<![0-9.])([0-9]{1,3}|[a-zA-Z])!(?!!)")


def _balanced(text: str, open_at: int, limit: int) -> int | None:
    """Index just past the bracket closing the one at ``open_at``, looking at most ``limit`` characters on."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    stack = []
    for i in range(open_at, min(len(text), open_at + limit + 1)):
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return None


def extract_final_answer(text: str, limit: int) -> str | None:
    """The final answer in ``text``: last ``\\boxed{...}``, else after the last ``####``, else the last
    ``<answer>``; longer than ``limit`` characters it is returned cut at ``limit + 1`` (so the caller sees it is
    too long). None when there is none."""
    start = max(text.rfind(b) for b in _BOXED)
    if start >= 0:
        brace = text.find("{", start)
        if brace >= 0 and text[start:brace].strip() in _BOXED:
            end = _balanced(text, brace, limit + 1)
            return text[brace + 1 : brace + limit + 2] if end is None else text[brace + 1 : end - 1]
    mark = text.rfind("####")
    if mark >= 0:
        line = text[mark + 4 :].split("\n", 1)[0]
        return line[: limit + 1]
    tag = text.rfind("<answer>")
    if tag >= 0:
        body = text[tag + len("<answer>") :]
        close = body.find("</answer>")
        return (body if close < 0 else body[:close])[: limit + 1]
    return None


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]" and depth:
            depth -= 1
    return deepest


def _exponent_at(answer: str, at: int) -> tuple[str, int]:
    """The exponent written from ``at`` (just after ``^`` or ``**``) and the index where it ends."""
    start = at
    while start < len(answer) and answer[start].isspace():
        start += 1
    if start < len(answer) and answer[start] in "{(":
        end = _balanced(answer, start, len(answer)) or len(answer)
        return answer[start + 1 : end - 1], end
    token = _EXPONENT_TOKEN.match(answer, start)
    end = token.end() if token else start
    return answer[start:end], end


def unsafe_reason(answer: str, max_nesting: int, max_exponent: int, max_symbolic_power: int = 64) -> str | None:
    """Why parsing ``answer`` could take unbounded time or memory in sympy, or None when it is bounded.

    Bounded means: nesting <= max_nesting, no big operators, no power towers, every integer in an exponent
    <= max_exponent and their product <= max_exponent ** 2 (nested powers multiply), or <= max_symbolic_power
    when the answer has a variable (comparing expands polynomials: (1+x)^{1000} never finishes), factorials only
    of a literal of at most three digits or of a single letter.
    """
    if _nesting(answer) > max_nesting:
        return f"nested deeper than {max_nesting}"
    if _BIG_OPERATORS.search(answer):
        return "big operator (sum, product, integral, limit or binomial)"
    product = 1
    for power in _POWER.finditer(answer):
        exponent, end = _exponent_at(answer, power.end())
        if _POWER.search(exponent) or answer[end:].lstrip().startswith(("^", "**")):
            return "power tower"
        if "!" in exponent:
            return "factorial in an exponent"
        for number in re.findall(r"[0-9]+", exponent):
            if len(number) > 9 or int(number) > max_exponent:
                return f"exponent above {max_exponent}"
            product *= max(1, int(number))
        if product > max_exponent**2:
            return f"exponents multiplying past {max_exponent ** 2}"
    if product > max_symbolic_power and _VARIABLE.search(_COMMAND.sub(" ", answer)):
        return f"power of an expression with a variable above {max_symbolic_power}"
    bangs = answer.count("!")
    if bangs and len(_FACTORIAL_OK.findall(answer)) != bangs:
        return "factorial of a large number or of an expression"
    return None


@functools.lru_cache(maxsize=4096)
def _parse(text: str):
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=None)  # the worker's limits bound it (see the module docstring)


@register_task("math")
class MathAnswer(FileTask):
    """Free-form math answers from a GSM8K/MATH-style file, compared with math-verify under bounded parsing.

    Takes FileTask's file and column arguments (veRL schema by default: ``reward_model.ground_truth``), plus
    ``correct_score``, ``format_score``, ``max_answer_chars``, ``max_nesting`` and ``max_exponent``.
    """

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        split_key: str | None = None,
        prompt_key: str = "prompt",
        answer_key: str = "reward_model.ground_truth",
        instruction: str = "",
        system_prompt: str | None = None,
        correct_score: float = 1.0,
        format_score: float = 0.0,
        max_answer_chars: int = 200,
        max_nesting: int = 12,
        max_exponent: int = 10_000,
        stop: Sequence[str] = (),
        chat_prefix: str = "",
        name: str = "math",
    ):
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("task 'math' needs math-verify: pip install 'tinyrl[math]'")
        for arg, value, low in (("max_answer_chars", max_answer_chars, 8), ("max_nesting", max_nesting, 1),
                                ("max_exponent", max_exponent, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TaskError(f"MathAnswer: {arg} must be an integer >= {low}, got {value!r}", key=f"kwargs.{arg}")
        self.correct_score, self.format_score = float(correct_score), float(format_score)
        self.max_answer_chars, self.max_nesting, self.max_exponent = max_answer_chars, max_nesting, max_exponent
        super().__init__(
            train_file, validation_file, test_file, split_key=split_key, prompt_key=prompt_key, answer_key=answer_key,
            instruction=instruction, system_prompt=system_prompt, stop=stop, chat_prefix=chat_prefix, name=name,
        )

    def gold(self, truth: Any) -> str:
        """The ground truth's final answer: after ``####``, inside ``\\boxed{}``, or the whole text."""
        text = str(truth)
        found = extract_final_answer(text, self.max_answer_chars) if ("####" in text or "\\boxed" in text) else text
        return (found or "").strip()

    def _check_answer(self, truth: Any) -> str | None:
        gold = self.gold(truth) if truth is not None else ""
        if not gold:
            return f"holds no answer: {truth!r:.80}"
        if len(gold) > self.max_answer_chars:
            return f"has an answer longer than max_answer_chars={self.max_answer_chars}"
        unsafe = unsafe_reason(gold, self.max_nesting, self.max_exponent)
        return f"cannot be checked safely ({unsafe}): {gold!r:.80}" if unsafe else None

    def prepare_worker(self) -> None:
        import logging

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeouts are off
        _parse("1")  # import sympy and the LaTeX parser before the first sample's clock starts

    def _score(self, completion: str, row: dict, completion_ids: Sequence[int] | None) -> Reward:
        """score = correct_score if verify(parse(gold), parse(answer)), format_score for another answer, else 0."""
        from math_verify import verify

        if not isinstance(completion, str):
            raise TypeError(f"MathAnswer.reward: completion must be str, got {type(completion).__name__}")

        def verdict(score: float, correct: bool, formatted: bool, **info) -> Reward:
            parts = {"correct": score if correct else 0.0, "format": 0.0 if correct else score}
            return Reward(score, correct, formatted, info, parts)

        answer = extract_final_answer(completion, self.max_answer_chars)
        if answer is None:
            return verdict(0.0, False, False, reason="no answer")
        answer = answer.strip()
        if not answer:
            return verdict(self.format_score, False, True, reason="empty answer")
        if len(answer) > self.max_answer_chars:
            return verdict(self.format_score, False, True, reason="answer too long")
        unsafe = unsafe_reason(answer, self.max_nesting, self.max_exponent)
        if unsafe:
            return verdict(self.format_score, False, True, reason="unsafe expression", detail=unsafe, answer=answer)
        gold = _parse(self.gold(self.answer(row)))
        if not gold:
            raise ValueError(f"math-verify cannot parse the ground truth {self.gold(self.answer(row))!r}")
        predicted = _parse(answer)
        if not predicted:
            return verdict(self.format_score, False, True, reason="unparsable", answer=answer)
        correct = bool(verify(gold, predicted, timeout_seconds=None))
        if correct:
            return verdict(self.correct_score, True, True, reason="correct", answer=answer)
        return verdict(self.format_score, False, True, reason="wrong answer", answer=answer)
