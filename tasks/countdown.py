"""Countdown: combine the given numbers with + - * / into an expression equal to the target.

The task of Stream of Search (Gandhi et al., 2024) and TinyZero (Pan et al., 2025), after the Countdown numbers
game; defaults follow TinyZero's Countdown-Tasks-3to4 data: 3 or 4 numbers from 1..99, targets 1..99.

Scores (``Countdown.reward``) are always one of three values:

* ``correct_score`` (1.0): the last ``<answer>...</answer>`` holds an expression that uses exactly the given
  numbers (each once; or at most once with ``use_all_numbers=False``) and equals the target;
* ``format_score`` (0.1): an ``<answer>`` tag is present but its content is wrong or malformed;
* ``0.0``: no ``<answer>`` tag.

``Reward.info["reason"]`` says why (one of ``REASONS``). The verifier never evaluates model text with eval: it
accepts only ASCII integer literals, binary + - * /, parentheses and whitespace, caps the answer length and the
nesting depth, checks the literals against the numbers before evaluating, and computes with exact fractions.
An unclosed ``<answer>`` at the end of a completion counts as closed (engines may strip the stop string).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Sequence, Union

from tinyrl.task import SPLITS, Reward, TaskError, TooFewProblems, register_task

__all__ = ["Countdown", "solve", "solve_trace", "split_of", "extract_answer", "check_answer", "REASONS"]

Value = Union[int, Fraction]
Tree = Union[int, tuple]  # a leaf number, or (op, left tree, right tree)

REASONS = (
    "correct",
    "no answer",
    "empty answer",
    "answer too long",
    "decimal point",
    "power operator",
    "floor division",
    "disallowed character",
    "unary operator",
    "leading zero",
    "too deeply nested",
    "syntax error",
    "wrong numbers",
    "division by zero",
    "wrong result",
)

# ----------------------------------------------------------------------------------------------------------------
# Exact arithmetic shared by the solver, the trace writer and the verifier
# ----------------------------------------------------------------------------------------------------------------


def _norm(v: Fraction) -> Value:
    return v.numerator if v.denominator == 1 else v


def _div(a: Value, b: Value) -> Value:
    """a / b exactly, as an int when it divides (b must be non-zero)."""
    if type(a) is int and type(b) is int:
        q, r = divmod(a, b)
        return q if r == 0 else Fraction(a, b)
    return _norm(Fraction(a) / b)


def _apply(op: str, a: Value, b: Value) -> Value | None:
    """a op b exactly; None for division by zero."""
    if op == "+":
        v = a + b
    elif op == "-":
        v = a - b
    elif op == "*":
        v = a * b
    else:
        return None if b == 0 else _div(a, b)
    return _norm(v) if type(v) is Fraction else v


# ----------------------------------------------------------------------------------------------------------------
# Exact solver
# ----------------------------------------------------------------------------------------------------------------
#
# reach(multiset) maps every value an expression over exactly that multiset can take to one expression tree for
# it; it is built from the reaches of all two-part splits of the multiset and memoised on the sorted multiset.
# solve() never builds the reach of the whole multiset: for each split (A, B) it runs over reach(A) and asks
# reach(B) for the one partner value each operator would need to hit the target. A first pass keeps integer
# values only (cheap: no Fraction objects) and finds most solutions; the full rational pass settles the rest.


@functools.lru_cache(maxsize=64)
def _index_splits(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Unordered splits of range(n) into two non-empty parts, smaller part first."""
    out = []
    for mask in range(1, 1 << n):
        if not mask & 1:
            continue  # put index 0 in the first part so each unordered split appears once
        a = tuple(i for i in range(n) if mask >> i & 1)
        b = tuple(i for i in range(n) if not mask >> i & 1)
        if b:
            out.append((a, b) if len(a) <= len(b) else (b, a))
    out.sort(key=lambda ab: len(ab[0]))
    return tuple(out)


@functools.lru_cache(maxsize=1 << 14)
def _value_splits(key: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    splits = [(tuple([key[i] for i in ia]), tuple([key[i] for i in ib])) for ia, ib in _index_splits(len(key))]
    if len(set(key)) == len(key):
        return splits
    seen = set()  # repeated numbers make some index splits equal as multisets
    out = []
    for a, b in splits:
        canon = (a, b) if (len(a), a) <= (len(b), b) else (b, a)
        if canon not in seen:
            seen.add(canon)
            out.append(canon)
    return out


def _combine_ints(out: dict, x: int, tx: Tree, y: int, ty: Tree) -> None:
    for v, tree in ((x + y, ("+", tx, ty)), (x - y, ("-", tx, ty)), (y - x, ("-", ty, tx)), (x * y, ("*", tx, ty))):
        if v not in out:
            out[v] = tree
    if y and x % y == 0 and x // y not in out:
        out[x // y] = ("/", tx, ty)
    if x and y % x == 0 and y // x not in out:
        out[y // x] = ("/", ty, tx)


def _combine_exact(out: dict, x: Value, tx: Tree, y: Value, ty: Tree) -> None:
    for v, tree in ((x + y, ("+", tx, ty)), (x - y, ("-", tx, ty)), (y - x, ("-", ty, tx)), (x * y, ("*", tx, ty))):
        if type(v) is Fraction:
            v = _norm(v)
        if v not in out:
            out[v] = tree
    if y != 0:
        v = _div(x, y)
        if v not in out:
            out[v] = ("/", tx, ty)
    if x != 0:
        v = _div(y, x)
        if v not in out:
            out[v] = ("/", ty, tx)


def _make_reach(combine, pair_cache: int, large_cache: int):
    """reach(key) over sorted tuples, with caches sized for pairs (small, widely shared) and larger multisets."""

    def build(key: tuple[int, ...]) -> dict:
        out: dict = {}
        for a, b in _value_splits(key):
            rb = reach(b)
            for x, tx in reach(a).items():
                for y, ty in rb.items():
                    combine(out, x, tx, y, ty)
        return out

    pair = functools.lru_cache(maxsize=pair_cache)(build)
    large = functools.lru_cache(maxsize=large_cache)(build)

    def reach(key: tuple[int, ...]) -> dict:
        if len(key) == 1:
            return {key[0]: key[0]}
        return pair(key) if len(key) == 2 else large(key)

    return reach


_reach_ints = _make_reach(_combine_ints, 1 << 16, 512)
_reach = _make_reach(_combine_exact, 1 << 16, 512)


def _check_problem(numbers: Sequence[int], target: int, where: str) -> tuple[tuple[int, ...], int]:
    if isinstance(numbers, (str, bytes)) or not hasattr(numbers, "__iter__"):
        raise ValueError(f"{where}: numbers must be a list of integers, got {numbers!r}")
    nums = tuple(numbers)
    if not nums or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in nums):
        raise ValueError(f"{where}: numbers must be a non-empty list of integers >= 0, got {list(nums)!r}")
    if not isinstance(target, int) or isinstance(target, bool):
        raise ValueError(f"{where}: target must be an integer, got {target!r}")
    return nums, target


def _find_ints(key: tuple[int, ...], t: int) -> Tree | None:
    for a, b in _value_splits(key):
        ra, rb = _reach_ints(a), _reach_ints(b)
        for x, tx in ra.items():
            # For each operator, the one value y in reach(B) that makes (x op y) or (y op x) equal t.
            ty = rb.get(t - x)
            if ty is not None:
                return ("+", tx, ty)
            ty = rb.get(x - t)
            if ty is not None:
                return ("-", tx, ty)
            ty = rb.get(t + x)
            if ty is not None:
                return ("-", ty, tx)
            if x:
                if t % x == 0:
                    ty = rb.get(t // x)
                    if ty is not None:
                        return ("*", tx, ty)
                ty = rb.get(t * x)
                if ty is not None:
                    return ("/", ty, tx)
                if t and x % t == 0:
                    ty = rb.get(x // t)
                    if ty is not None:
                        return ("/", tx, ty)
            elif t == 0:
                return ("*", tx, next(iter(rb.values())))
    return None


def _find_exact(key: tuple[int, ...], t: int) -> Tree | None:
    for a, b in _value_splits(key):
        ra, rb = _reach(a), _reach(b)
        for x, tx in ra.items():
            ty = rb.get(t - x)
            if ty is not None:
                return ("+", tx, ty)
            ty = rb.get(x - t)
            if ty is not None:
                return ("-", tx, ty)
            ty = rb.get(t + x)
            if ty is not None:
                return ("-", ty, tx)
            if x != 0:
                ty = rb.get(_div(t, x))
                if ty is not None:
                    return ("*", tx, ty)
                ty = rb.get(t * x)
                if ty is not None:
                    return ("/", ty, tx)
                if t != 0:
                    ty = rb.get(_div(x, t))
                    if ty is not None:
                        return ("/", tx, ty)
            elif t == 0:
                return ("*", tx, next(iter(rb.values())))
    return None


def _solve_tree(numbers: Sequence[int], target: int) -> Tree | None:
    nums, t = _check_problem(numbers, target, "solve")
    key = tuple(sorted(nums))
    if len(key) == 1:
        return key[0] if key[0] == t else None
    return _find_ints(key, t) or _find_exact(key, t)


def _format(tree: Tree) -> tuple[str, int]:
    """Expression text with the fewest parentheses, and its precedence (1: + -, 2: * /, 3: a number).

    Dropping parentheses around a right operand of + (or of * when it is a product/quotient) re-associates the
    expression; with exact rational arithmetic the value is unchanged.
    """
    if type(tree) is not tuple:
        return str(tree), 3
    op, left, right = tree
    ls, lp = _format(left)
    rs, rp = _format(right)
    if op in "+-":
        if op == "-" and rp == 1:
            rs = f"({rs})"
        return f"{ls}{op}{rs}", 1
    if lp == 1:
        ls = f"({ls})"
    if rp == 1 or (op == "/" and rp == 2):
        rs = f"({rs})"
    return f"{ls}{op}{rs}", 2


def solve(numbers: Sequence[int], target: int) -> str | None:
    """An expression using each number exactly once with + - * / that equals ``target`` (exact), or None.

    reach(S) = U over splits S = A+B of {x op y : x in reach(A), y in reach(B), op in + - * /}; solvable iff
    target in reach(numbers). The exhaustive search of Countdown solvers, as used to build and check the task in
    Stream of Search (Gandhi et al., 2024) and TinyZero (Pan et al., 2025); memoised on sorted sub-multisets,
    fine up to 6 numbers.
    """
    tree = _solve_tree(numbers, target)
    return None if tree is None else _format(tree)[0]


# ----------------------------------------------------------------------------------------------------------------
# Search traces for the supervised warm start
# ----------------------------------------------------------------------------------------------------------------


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _show(v: Value, operand: bool) -> str:
    text = str(v)  # Fraction prints as "7/2"
    return f"({text})" if operand and (type(v) is Fraction or v < 0) else text


def _tree_steps(tree: Tree, steps: list[str]) -> Value:
    if type(tree) is not tuple:
        return tree
    op, left, right = tree
    a = _tree_steps(left, steps)
    b = _tree_steps(right, steps)
    v = _apply(op, a, b)
    steps.append(f"{_show(a, True)}{op}{_show(b, True)}={_show(v, False)}")
    return v


# How an attempt's result is checked against the target: the verdict after a miss, after the solution.
_CHECKS = {
    "sentence": ("{value} is not {target}.", "That is {target}."),
    # the target is written next to the result before the verdict, so the verdict compares two adjacent numbers
    "target": ("Want {target}: no.", "Want {target}: yes."),
}


def _failed_attempt(rng: random.Random, numbers: Sequence[int], target: int, check: str = "sentence") -> str | None:
    """A plausible combination sequence that misses the target, or None if the draws kept hitting it."""
    for _ in range(5):
        values: list[Value] = list(numbers)
        rng.shuffle(values)
        steps = []
        while len(values) > 1:
            b, a = values.pop(), values.pop()
            if a < b:
                a, b = b, a
            op = rng.choice("+-*/" if b != 0 and a % b == 0 else "+-*")
            v = _apply(op, a, b)
            steps.append(f"{a}{op}{b}={v}")
            values.insert(rng.randrange(len(values) + 1), v)
        if values[0] != target:
            return f"Try {', '.join(steps)}. " + _CHECKS[check][0].format(value=values[0], target=target)
    return None


def _miss_count(rng: random.Random, max_misses: int, miss_chance: float | None) -> int:
    """0..max_misses, uniform when `miss_chance` is None; else another miss follows with chance `miss_chance`."""
    if miss_chance is None:
        return rng.randrange(max_misses + 1)
    count = 0
    while count < max_misses and rng.random() < miss_chance:
        count += 1
    return count


def _trace_and_expression(
    numbers: Sequence[int], target: int, max_misses: int = 2, miss_chance: float | None = None, check: str = "sentence"
) -> tuple[str, str] | None:
    tree = _solve_tree(numbers, target)
    if tree is None:
        return None
    rng = random.Random(_stable_int(f"trace|{sorted(numbers)}|{target}"))
    lines = []
    for _ in range(_miss_count(rng, max_misses, miss_chance)):  # misses before the solution, fixed per problem
        miss = _failed_attempt(rng, numbers, target, check)
        if miss:
            lines.append(miss)
    steps: list[str] = []
    _tree_steps(tree, steps)
    verdict = _CHECKS[check][1].format(target=target)
    lines.append(f"Try {', '.join(steps)}. {verdict}" if steps else f"{target} is already given.")
    return "\n".join(lines), _format(tree)[0]


def solve_trace(numbers: Sequence[int], target: int) -> str | None:
    """A short search trace ("Try 25+3=28, 28*2=56, 56-6=50. That is 50."), possibly after a miss or two.

    trace = [miss_1, ..., miss_k, solution steps in post-order], k in {0, 1, 2} fixed by a hash of the problem:
    a search written out as text, after Stream of Search (Gandhi et al., 2024). None when there is no solution.
    """
    found = _trace_and_expression(numbers, target)
    return None if found is None else found[0]


# ----------------------------------------------------------------------------------------------------------------
# Calculator: the environment writes each step's result and each attempt's verdict
# ----------------------------------------------------------------------------------------------------------------

_NUM = r"\(?(-?\d{1,12}(?:/\d{1,12})?)\)?"
_STEP_ASKED = re.compile(_NUM + r"([-+*/])" + _NUM + r"=$")  # "13+10=": the policy asks for a result
_ATTEMPT_ENDED = re.compile(r"=(-?\d{1,24}(?:/\d{1,24})?)\.$")  # "..., 23-6=17.": the last result, then "."
_PROMPT_TARGET = re.compile(r"(?:to make|equals) (-?\d+)")


@dataclass(frozen=True)
class CountdownCalculator:
    """Countdown's environment inside a completion (`tinyrl.rollout.Feedback`): the exact result after every
    "a op b =" the policy writes, and after an attempt's closing "." the verdict against the target, in the
    teacher's words (" That is 17.\n" or " 29 is not 17.\n"). The policy chooses the attempts and the answer; the
    calculator only computes and compares, like a tool call whose result comes back into the context.
    """

    check: str = "sentence"
    triggers: ClassVar[str] = "=."

    def __call__(self, prompt: str, text: str) -> str | None:
        if text.endswith("="):
            return self.result(text)
        try:
            return self._verdict(prompt, text[-64:])
        except ZeroDivisionError:  # a written result such as "3/0"
            return None

    @staticmethod
    def result(text: str) -> str | None:
        """The exact value of the `a op b =` that `text` ends with ("23", "-2", "7/2"), or None (no such step,
        or a division by zero)."""
        asked = _STEP_ASKED.search(text[-64:])
        if asked is None:
            return None
        try:
            a, op, b = Fraction(asked.group(1)), asked.group(2), Fraction(asked.group(3))
        except ZeroDivisionError:  # a written operand such as "(5/0)"
            return None
        value = _apply(op, _norm(a), _norm(b))
        return None if value is None else _show(value, False)

    def _verdict(self, prompt: str, tail: str) -> str | None:
        ended = _ATTEMPT_ENDED.search(tail)
        targets = _PROMPT_TARGET.findall(prompt)
        if ended is None or not targets:
            return None
        target, value = int(targets[-1]), _norm(Fraction(ended.group(1)))
        miss, hit = _CHECKS[self.check]
        verdict = hit.format(target=target) if value == target else miss.format(value=value, target=target)
        return f" {verdict}\n"  # the newline too: the teacher's traces hold ".\n" as one token


# ----------------------------------------------------------------------------------------------------------------
# Verifier
# ----------------------------------------------------------------------------------------------------------------

_OPEN, _CLOSE = "<answer>", "</answer>"
_ALLOWED = re.compile(r"[0-9+\-*/() \t\r\n]*")
_TOKEN = re.compile(r"[0-9]+|[-+*/()]")


class _Reject(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>`` tag (to its ``</answer>``, or to the end if unclosed), or None."""
    start = completion.rfind(_OPEN)
    if start < 0:
        return None
    start += len(_OPEN)
    end = completion.find(_CLOSE, start)
    return completion[start:] if end < 0 else completion[start:end]


def _to_rpn(tokens: list[str], max_nesting: int) -> list[str]:
    """Recursive descent over expr := term (+|- term)*, term := factor (*|/ factor)*, factor := INT | ( expr )."""
    out: list[str] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def expr(depth: int) -> None:
        nonlocal pos
        term(depth)
        while peek() in ("+", "-"):
            op = tokens[pos]
            pos += 1
            term(depth)
            out.append(op)

    def term(depth: int) -> None:
        nonlocal pos
        factor(depth)
        while peek() in ("*", "/"):
            op = tokens[pos]
            pos += 1
            factor(depth)
            out.append(op)

    def factor(depth: int) -> None:
        nonlocal pos
        tok = peek()
        if tok is None:
            raise _Reject("syntax error")
        pos += 1
        if tok == "(":
            if depth >= max_nesting:
                raise _Reject("too deeply nested")
            expr(depth + 1)
            if peek() != ")":
                raise _Reject("syntax error")
            pos += 1
        elif tok[0].isdigit():  # tokens are ASCII only, see _TOKEN
            if len(tok) > 1 and tok[0] == "0":
                raise _Reject("leading zero")
            out.append(tok)
        elif tok in ("+", "-"):
            raise _Reject("unary operator")
        else:
            raise _Reject("syntax error")

    expr(0)
    if pos != len(tokens):
        raise _Reject("syntax error")
    return out


def _evaluate(rpn: list[str]) -> Value:
    stack: list[Value] = []
    for tok in rpn:
        if tok[0].isdigit():
            stack.append(int(tok))
            continue
        b = stack.pop()
        a = stack.pop()
        v = _apply(tok, a, b)
        if v is None:
            raise _Reject("division by zero")
        stack.append(v)
    return stack[0]


def check_answer(
    answer: str, numbers: Sequence[int], target: int, use_all_numbers: bool = True, max_nesting: int = 16
) -> str:
    """The reason code for an answer's content: "correct" or why it is wrong (see REASONS).

    The caller bounds ``len(answer)``; the work here is linear in it.
    """
    text = answer.strip()
    if not text:
        return "empty answer"
    if "." in text:
        return "decimal point"
    if "**" in text:
        return "power operator"
    if "//" in text:
        return "floor division"
    if not _ALLOWED.fullmatch(text):
        return "disallowed character"
    try:
        rpn = _to_rpn(_TOKEN.findall(text), max_nesting)
        used = Counter(int(tok) for tok in rpn if tok[0].isdigit())
        given = Counter(numbers)
        fits = used == given if use_all_numbers else all(used[n] <= given[n] for n in used)
        if not fits:
            return "wrong numbers"
        value = _evaluate(rpn)
    except _Reject as rejection:
        return rejection.reason
    return "correct" if value == target else "wrong result"


# ----------------------------------------------------------------------------------------------------------------
# Problem generator
# ----------------------------------------------------------------------------------------------------------------

_SPLIT_SHARES = (("train", 80), ("validation", 10), ("test", 10))  # percent of the hash space
_SPLIT_OF_BUCKET = tuple(name for name, share in _SPLIT_SHARES for _ in range(share))
# Consecutive candidates without a new problem before concluding the split is nearly used up (see dataset()).
_STALL_MIN, _STALL_MAX = 2_000, 200_000
_ENUMERATION_BUDGET = 200_000  # weighted multiset count up to which the whole problem space may be listed
_REACH_COST = {1: 1, 2: 1, 3: 1, 4: 40, 5: 2_000, 6: 100_000}  # rough relative cost of one multiset's reach


def _split_of_key(key: tuple[tuple[int, ...], int]) -> str:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return _SPLIT_OF_BUCKET[int.from_bytes(digest, "big") % 100]


def split_of(numbers: Sequence[int], target: int) -> str:
    """The split a problem belongs to: a stable hash of (sorted numbers, target), so splits never overlap.

    bucket = blake2b(repr((sorted numbers, target))) mod 100: train 0-79, validation 80-89, test 90-99.
    """
    return _split_of_key((tuple(sorted(numbers)), target))


@functools.lru_cache(maxsize=8)
def _problem_space(
    min_numbers: int, max_numbers: int, min_number: int, max_number: int, min_target: int, max_target: int, split: str
) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Every solvable (sorted numbers, target) of a split, by exhaustive search: for small configurations only."""
    out = []
    for k in range(min_numbers, max_numbers + 1):
        for key in itertools.combinations_with_replacement(range(min_number, max_number + 1), k):
            for target in sorted(v for v in _reach(key) if type(v) is int and min_target <= v <= max_target):
                if _split_of_key((key, target)) == split:
                    out.append((key, target))
    return tuple(out)


def _random_problem(rand, lo: int, span: int, k_min: int, k_span: int) -> tuple[list[int], int]:
    """Random numbers and the value of a random expression tree over them (non-negative integer steps only).

    ``rand`` is a ``random.Random().random``; plain float draws keep this loop cheap.
    """
    numbers = [lo + int(rand() * span) for _ in range(k_min + int(rand() * k_span))]
    values = numbers[:]
    n = len(values)
    while n > 1:
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        j += j >= i
        a, b = values[i], values[j]
        if a < b:
            a, b = b, a
        op = int(rand() * 4)
        if op == 0:
            v = a + b
        elif op == 1:
            v = a - b
        elif op == 2:
            v = a * b
        else:
            v = a // b if b != 0 and a % b == 0 else a + b
        values[i] = v
        values.pop(j)
        n -= 1
    return numbers, values[0]


# ----------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------

_EXAMPLE_ANSWER = "(6 + 4) * 2 - 1"


@register_task("countdown")
@dataclass(frozen=True)
class Countdown:
    """Countdown: combine the given numbers with + - * / into an expression equal to the target.

    Rows: ``{"numbers": [int, ...], "target": int}``.
    """

    name: ClassVar[str] = "countdown"
    stop: ClassVar[tuple[str, ...]] = (_CLOSE,)
    chat_prefix: ClassVar[str] = "Let me solve this step by step.\n<think>"
    ability: ClassVar[str] = "math"

    min_numbers: int = 3
    max_numbers: int = 4
    min_number: int = 1
    max_number: int = 99
    min_target: int = 1
    max_target: int = 99
    use_all_numbers: bool = True
    correct_score: float = 1.0
    format_score: float = 0.1
    max_answer_chars: int = 200
    max_nesting: int = 16
    prompt_style: str = "prose"  # prose: the User/Assistant template; compact: one short line (tiny CPU models)
    trace_misses: int = 2  # at most this many failed attempts before the solution in teacher traces
    # null: 0..trace_misses misses, uniformly; p: after each attempt another miss follows with chance p (so the
    # chance that the next attempt is the solution does not grow with the attempts already made)
    trace_miss_chance: float | None = None
    trace_check: str = "sentence"  # sentence: "29 is not 17." / "That is 17."; target: "Want 17: no." / "... yes."
    calculator: bool = False  # the environment writes each step's result and each attempt's verdict (rollouts, eval)

    def __post_init__(self) -> None:
        def need_int(arg: str, low: int, high: int) -> None:
            v = getattr(self, arg)
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                raise TaskError(f"Countdown: {arg} must be an integer in [{low}, {high}], got {v!r}",
                                key=f"kwargs.{arg}")

        need_int("min_numbers", 1, 6)
        need_int("max_numbers", self.min_numbers, 6)
        need_int("min_number", 0, 10**6)
        need_int("max_number", self.min_number, 10**6)
        need_int("min_target", -(10**9), 10**9)
        need_int("max_target", self.min_target, 10**9)
        need_int("max_answer_chars", 8, 100_000)
        need_int("max_nesting", 1, 100)
        need_int("trace_misses", 0, 5)
        chance = self.trace_miss_chance
        if chance is not None and (isinstance(chance, bool) or not isinstance(chance, (int, float)) or not 0 <= chance < 1):
            raise TaskError(f"Countdown: trace_miss_chance must be null or a number in [0, 1), got {chance!r}",
                            key="kwargs.trace_miss_chance")
        if self.trace_check not in _CHECKS:
            raise TaskError(f"Countdown: trace_check must be one of {sorted(_CHECKS)}, got {self.trace_check!r}",
                            key="kwargs.trace_check")
        if not isinstance(self.calculator, bool):
            raise TaskError(f"Countdown: calculator must be true or false, got {self.calculator!r}",
                            key="kwargs.calculator")
        if self.prompt_style not in ("prose", "compact"):
            raise TaskError(f"Countdown: prompt_style must be 'prose' or 'compact', got {self.prompt_style!r}",
                            key="kwargs.prompt_style")
        if not isinstance(self.use_all_numbers, bool):
            raise TaskError(f"Countdown: use_all_numbers must be true or false, got {self.use_all_numbers!r}",
                            key="kwargs.use_all_numbers")
        for arg in ("correct_score", "format_score"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TaskError(f"Countdown: {arg} must be a finite number, got {v!r}", key=f"kwargs.{arg}")
            object.__setattr__(self, arg, float(v))

    # -- problems -----------------------------------------------------------------------------------------------

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        """``size`` distinct problems of ``split``, deterministic for ``seed``; solvable by construction.

        Each problem is a random expression tree over random numbers (so it has a solution); a stable hash of
        (sorted numbers, target) decides its split, so splits are disjoint for any sizes and seeds. A list of
        size n is a prefix of the list of size n + 1 for the same seed.
        """
        if split not in SPLITS:
            raise ValueError(f"Countdown.dataset: split must be one of {SPLITS}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"Countdown.dataset: size must be an integer >= 0, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Countdown.dataset: seed must be an integer, got {seed!r}")
        bound = self._multiset_count() * (self.max_target - self.min_target + 1)
        if size > bound:
            raise self._too_many(split, size, f"at most {bound}")
        if size * 8 > bound and self._enumerable():  # a large share of a small space: count it exactly first
            available = len(self._space(split))
            if size > available:
                raise self._too_many(split, size, f"only {available}")

        rng = random.Random(_stable_int(f"countdown|{split}|{seed}"))
        rand = rng.random
        span = self.max_number - self.min_number + 1
        k_span = self.max_numbers - self.min_numbers + 1
        lo, hi = self.min_target, self.max_target
        seen: set[tuple[tuple[int, ...], int]] = set()
        elsewhere: set[tuple[tuple[int, ...], int]] = set()  # problems of other splits, to skip re-hashing them
        rows: list[dict] = []
        attempts = misses = 0
        while len(rows) < size:
            attempts += 1
            numbers, target = _random_problem(rand, self.min_number, span, self.min_numbers, k_span)
            if lo <= target <= hi:
                key = (tuple(sorted(numbers)), target)
                if key not in seen and key not in elsewhere:
                    if _split_of_key(key) == split:
                        seen.add(key)
                        rows.append({"numbers": numbers, "target": target})
                        misses = 0
                        continue
                    elsewhere.add(key)
            misses += 1
            # A miss streak far longer than the hit rate so far predicts means the split is nearly used up.
            if misses > min(_STALL_MAX, max(_STALL_MIN, 30 * attempts // (len(rows) + 1))):
                rows.extend(self._fill_by_enumeration(split, size, rng, seen, len(rows), attempts))
                break
        return rows

    def _multiset_count(self) -> int:
        span = self.max_number - self.min_number + 1
        return sum(math.comb(span + k - 1, k) for k in range(self.min_numbers, self.max_numbers + 1))

    def _too_many(self, split: str, size: int, available: str) -> TooFewProblems:
        return TooFewProblems(
            f"Countdown.dataset: asked for {size} {split} problems but {available} distinct ones exist with "
            f"{self.min_numbers}-{self.max_numbers} numbers from {self.min_number}..{self.max_number} and targets "
            f"{self.min_target}..{self.max_target}; ask for fewer or widen the ranges"
        )

    def _enumerable(self) -> bool:
        span = self.max_number - self.min_number + 1
        cost = sum(math.comb(span + k - 1, k) * _REACH_COST[k] for k in range(self.min_numbers, self.max_numbers + 1))
        return cost <= _ENUMERATION_BUDGET

    def _space(self, split: str) -> tuple[tuple[tuple[int, ...], int], ...]:
        numbers = (self.min_numbers, self.max_numbers, self.min_number, self.max_number)
        return _problem_space(*numbers, self.min_target, self.max_target, split)

    def _fill_by_enumeration(
        self, split: str, size: int, rng: random.Random, seen: set, have: int, attempts: int
    ) -> list[dict]:
        """Random draws stopped finding new problems: list the whole space (when small enough) to finish."""
        if not self._enumerable():
            raise self._too_many(split, size, f"random draws found only {have} in {attempts} tries; likely few")
        remaining = [problem for problem in self._space(split) if problem not in seen]
        if have + len(remaining) < size:
            raise self._too_many(split, size, f"only {have + len(remaining)}")
        rng.shuffle(remaining)
        rows = []
        for key, target in remaining[: size - have]:
            numbers = list(key)
            rng.shuffle(numbers)
            rows.append({"numbers": numbers, "target": target})
        return rows

    # -- prompts ------------------------------------------------------------------------------------------------

    def _question(self, row: dict) -> str:
        numbers, target = self._row(row)
        if self.use_all_numbers:
            usage = "use every number exactly once"
        else:
            usage = "use each number at most once (you may leave some out)"
        return (
            f"Using the numbers {list(numbers)}, write an arithmetic expression that equals {target}. "
            f"Rules: {usage}; combine them only with + - * / and parentheses; no other numbers, no powers, "
            f"no decimals. Reason inside <think> </think> tags, then put only the expression inside "
            f"<answer> </answer> tags, for example <answer>{_EXAMPLE_ANSWER}</answer>."
        )

    def prompt(self, row: dict) -> str:
        """Base-model template in User/Assistant prose, ending in an open <think> block.

        With ``prompt_style="compact"`` the same rules in one short line, for tiny models trained on a CPU where
        every prompt token costs time in every forward pass.
        """
        if self.prompt_style == "compact":
            numbers, target = self._row(row)
            usage = "each once" if self.use_all_numbers else "each at most once"
            return f"Use {' '.join(map(str, numbers))} ({usage}, + - * / only) to make {target}.\n<think>"
        return (
            "The User poses an arithmetic puzzle and the Assistant solves it: the Assistant reasons step by "
            "step inside <think> </think> and then gives the final expression inside <answer> </answer>.\n"
            f"User: {self._question(row)}\n"
            f"Assistant: {self.chat_prefix}"
        )

    def messages(self, row: dict) -> list[dict]:
        """Chat form; the assistant turn then starts with ``chat_prefix``."""
        return [
            {
                "role": "system",
                "content": "You solve arithmetic puzzles. Reason step by step inside <think> </think>, then give "
                "only the final expression inside <answer> </answer>.",
            },
            {"role": "user", "content": self._question(row)},
        ]

    # -- scoring ------------------------------------------------------------------------------------------------

    @staticmethod
    def _row(row: dict) -> tuple[tuple[int, ...], int]:
        if not isinstance(row, dict) or "numbers" not in row or "target" not in row:
            raise ValueError(f"Countdown: a row needs 'numbers' and 'target' keys, got {row!r}")
        return _check_problem(row["numbers"], row["target"], "Countdown row")

    def reward(self, completion: str, row: dict) -> Reward:
        """Score from {0.0, format_score, correct_score}: the last <answer> must equal the target exactly.

        score = correct_score if multiset(literals) == numbers and value == target (exact), format_score if an
        <answer> tag is present, else 0: TinyZero's Countdown reward (Pan et al., 2025), with its holes closed.
        """
        if not isinstance(completion, str):
            raise TypeError(f"Countdown.reward: completion must be str, got {type(completion).__name__}")
        numbers, target = self._row(row)
        answer = extract_answer(completion)
        if answer is None:
            return Reward(0.0, False, False, {"reason": "no answer"}, {"correct": 0.0, "format": 0.0})
        if len(answer) > self.max_answer_chars:
            info = {"reason": "answer too long", "answer": answer[: self.max_answer_chars]}
            return Reward(self.format_score, False, True, info, {"correct": 0.0, "format": self.format_score})
        reason = check_answer(answer, numbers, target, self.use_all_numbers, self.max_nesting)
        correct = reason == "correct"
        score = self.correct_score if correct else self.format_score
        parts = {"correct": score if correct else 0.0, "format": 0.0 if correct else score}  # they add up to score
        return Reward(score, correct, True, {"reason": reason, "answer": answer.strip()}, parts)

    @property
    def feedback(self) -> CountdownCalculator | None:
        """The calculator when `calculator` is on: rollout engines write its words into completions."""
        return CountdownCalculator(self.trace_check) if self.calculator else None

    # -- teacher ------------------------------------------------------------------------------------------------

    solve = staticmethod(solve)
    solve_trace = staticmethod(solve_trace)

    def demonstration(self, row: dict) -> str | None:
        """A teacher completion continuing ``prompt(row)``: a short search, then the answer; None if unsolvable."""
        numbers, target = self._row(row)
        found = _trace_and_expression(numbers, target, self.trace_misses, self.trace_miss_chance, self.trace_check)
        if found is None:
            return None
        trace, expression = found
        return f"\n{trace}\n</think>\n<answer>{expression}</answer>"
