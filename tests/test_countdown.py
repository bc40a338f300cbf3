"""Countdown: generator, exact solver, prompts, teacher traces, and the hardened verifier (with a fuzz test)."""

from __future__ import annotations

import gc
import itertools
import json
import random
import re
import time
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyrl.task import TooFewProblems, get_task
from tinyrl.tasks.countdown import REASONS, Countdown, solve, solve_trace, split_of

CD = Countdown()
SCORES = {0.0, CD.format_score, CD.correct_score}


def answer(expression: str, before: str = "Let me think. ", after: str = "") -> str:
    return f"{before}<answer>{expression}</answer>{after}"


def score(expression: str, numbers: list[int], target: int, task: Countdown = CD, **kw):
    return task.reward(answer(expression, **kw), {"numbers": numbers, "target": target})


def key(row: dict) -> tuple[tuple[int, ...], int]:
    return tuple(sorted(row["numbers"])), row["target"]


def all_values(numbers: tuple[int, ...]) -> set[Fraction]:
    """Every value of every expression using all of ``numbers`` once (independent brute force, up to 3 numbers)."""
    ops = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
        "/": lambda a, b: a / b if b != 0 else None,
    }
    if len(numbers) == 1:
        return {Fraction(numbers[0])}
    out = set()
    for perm in itertools.permutations(numbers):
        a, b, *rest = map(Fraction, perm)
        for f in ops.values():
            ab = f(a, b)
            if ab is None:
                continue
            if not rest:
                out.add(ab)
                continue
            (c,) = rest
            for g in ops.values():
                for v in (g(ab, c), g(c, ab)):
                    if v is not None:
                        out.add(v)
                bc = g(b, c)
                if bc is not None:
                    v = f(a, bc)
                    if v is not None:
                        out.add(v)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The holes in TinyZero's verifier, one test per row of the table
# ---------------------------------------------------------------------------------------------------------------


def test_decimal_point_cannot_glue_numbers():
    r = score("1.2*5+4", [1, 2, 5, 4], 10)
    assert not r.correct and r.score == CD.format_score and r.info["reason"] == "decimal point"


def test_floor_division_is_refused():
    r = score("(7+8)//2 + 3", [7, 8, 2, 3], 10)
    assert not r.correct and r.score == CD.format_score and r.info["reason"] == "floor division"


def test_power_is_refused():
    r = score("2**3+1", [2, 3, 1], 9)
    assert not r.correct and r.score == CD.format_score and r.info["reason"] == "power operator"


def test_power_tower_is_refused_without_evaluating_it():
    start = time.perf_counter()
    r = score("9**9**9", [9, 9, 9], 1)
    assert time.perf_counter() - start < 1.0  # evaluating it would never finish
    assert not r.correct and r.info["reason"] == "power operator"


@pytest.mark.parametrize("after", ["\n", "\n\nThe answer is above.", " and that is final.\nBye"])
def test_text_after_the_answer_does_not_hide_it(after):
    r = score("(25+3)*2-6", [25, 3, 2, 6], 50, after=after)
    assert r.correct and r.score == CD.correct_score and r.info["reason"] == "correct"


# ---------------------------------------------------------------------------------------------------------------
# More verifier behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_exact_fractions_accept_what_floats_would_miss():
    assert 8 / (3 - 8 / 3) != 24  # floating point gets this wrong
    assert score("8/(3-8/3)", [3, 3, 8, 8], 24).correct
    assert score("5*(5-1/5)", [1, 5, 5, 5], 24).correct


def test_last_answer_tag_wins_and_can_sit_anywhere():
    row = {"numbers": [3, 1], "target": 3}
    assert CD.reward("<answer>3+1</answer> wait <answer>3*1</answer> done", row).correct
    assert not CD.reward("<answer>3*1</answer> wait <answer>3+1</answer>", row).correct
    # An unclosed final tag counts (engines may strip the stop string) ...
    assert CD.reward("thinking... <answer>3*1", row).correct
    # ... and a later empty or unclosed tag still replaces an earlier answer.
    assert CD.reward("<answer>3*1</answer> <answer>", row).info["reason"] == "empty answer"


def test_no_answer_scores_zero_and_is_not_formatted():
    r = CD.reward("I think it is (25+3)*2-6", {"numbers": [25, 3, 2, 6], "target": 50})
    assert r.score == 0.0 and not r.formatted and not r.correct and r.info["reason"] == "no answer"
    assert CD.reward("<Answer>3*1</Answer>", {"numbers": [3, 1], "target": 3}).score == 0.0


@pytest.mark.parametrize(
    "expression, numbers, target, reason",
    [
        ("", [1, 2], 3, "empty answer"),
        ("   ", [1, 2], 3, "empty answer"),
        ("-1+2+3", [1, 2, 3], 4, "unary operator"),
        ("1+(-2)+3", [1, 2, 3], 2, "unary operator"),
        ("+1+2", [1, 2], 3, "unary operator"),
        ("01+2", [1, 2], 3, "leading zero"),
        ("١+2", [1, 2], 3, "disallowed character"),  # Arabic-Indic digit one
        ("１+2", [1, 2], 3, "disallowed character"),  # full-width digit one
        ("abs(1)+2", [1, 2], 3, "disallowed character"),
        ("__import__('os')", [1], 1, "disallowed character"),
        ("1e1+2", [10, 2], 12, "disallowed character"),
        ("0x1+2", [1, 2], 3, "disallowed character"),
        ("1_0+2", [10, 2], 12, "disallowed character"),
        ("1+2=3", [1, 2], 3, "disallowed character"),
        ("1%2+2", [1, 2, 2], 3, "disallowed character"),
        ("1 2+3", [12, 3], 15, "syntax error"),
        ("(1+2", [1, 2], 3, "syntax error"),
        ("1+2)", [1, 2], 3, "syntax error"),
        ("()1+2", [1, 2], 3, "syntax error"),
        ("1+*2", [1, 2], 2, "syntax error"),
        ("1+2", [1, 2, 3], 3, "wrong numbers"),  # a number left out
        ("1+2+2", [1, 2], 5, "wrong numbers"),  # a number used twice
        ("10+2", [1, 2], 12, "wrong numbers"),
        ("3/(2-2)+1", [3, 2, 2, 1], 1, "division by zero"),
        ("3+2", [3, 2], 6, "wrong result"),
        ("7/2", [7, 2], 3, "wrong result"),  # exact: 7/2 is not 3
        ("(" * 17 + "1+2" + ")" * 17, [1, 2], 3, "too deeply nested"),
        ("(" * 16 + "1+2" + ")" * 16, [1, 2], 3, "correct"),
        (" ((25 + 3) * 2\n- 6) ", [25, 3, 2, 6], 50, "correct"),
    ],
)
def test_reason_codes(expression, numbers, target, reason):
    r = score(expression, numbers, target)
    assert r.info["reason"] == reason
    assert r.correct == (reason == "correct") and r.formatted
    assert r.score == (CD.correct_score if reason == "correct" else CD.format_score)


def test_answer_length_is_capped_before_parsing():
    task = Countdown(max_answer_chars=40)
    long = "+".join(["1"] * 30)
    r = score(long, [1] * 30, 30, task=task)
    assert r.info["reason"] == "answer too long" and len(r.info["answer"]) == 40
    huge = "<answer>" + "9" * 1_000_000
    r = task.reward(huge, {"numbers": [9], "target": 9})
    assert r.info["reason"] == "answer too long" and r.score == task.format_score


def test_at_most_once_mode_and_custom_scores():
    loose = Countdown(use_all_numbers=False, correct_score=2.0, format_score=-0.5)
    assert score("25*2", [25, 3, 2, 6], 50, task=loose).score == 2.0
    assert score("25*2", [25, 3, 2, 6], 50).info["reason"] == "wrong numbers"
    r = score("25+25", [25, 3, 2, 6], 50, task=loose)
    assert r.info["reason"] == "wrong numbers" and r.score == -0.5
    assert loose.reward("no tag", {"numbers": [1], "target": 1}).score == 0.0


def test_bad_rows_and_completions_raise_clear_errors():
    with pytest.raises(ValueError, match="'target'"):
        CD.reward("<answer>1</answer>", {"numbers": [1]})
    with pytest.raises(ValueError, match="numbers"):
        CD.reward("<answer>1</answer>", {"numbers": "12", "target": 1})
    with pytest.raises(ValueError, match="target"):
        CD.reward("<answer>1</answer>", {"numbers": [1], "target": 1.5})
    with pytest.raises(TypeError, match="str"):
        CD.reward(b"<answer>1</answer>", {"numbers": [1], "target": 1})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "numbers, target",
    [([3, 3, 8, 8], 24), ([1, 5, 5, 5], 24), ([25, 3, 2, 6], 50), ([7, 9, 13, 17, 19], 3), ([4], 4), ([0, 5], 0)],
)
def test_solver_finds_solutions_that_score_correct(numbers, target):
    expression = solve(numbers, target)
    assert expression is not None
    assert sorted(int(n) for n in re.findall(r"[0-9]+", expression)) == sorted(numbers)
    assert score(expression, numbers, target).correct


def test_solver_reports_unsolvable_problems():
    assert solve([1, 1, 1], 100) is None
    assert solve([2, 2], 5) is None
    assert solve([4], 5) is None
    assert solve_trace([1, 1, 1], 100) is None
    assert CD.demonstration({"numbers": [1, 1, 1], "target": 100}) is None
    with pytest.raises(ValueError, match="numbers"):
        solve([1, -2], 3)


def test_solver_agrees_with_brute_force_on_every_small_problem():
    for numbers in itertools.combinations_with_replacement(range(0, 7), 3):
        values = all_values(numbers)
        for target in range(-10, 40):
            expression = solve(numbers, target)
            assert (expression is not None) == (Fraction(target) in values), (numbers, target)
            if expression is not None:
                assert score(expression, list(numbers), target).correct, (numbers, target, expression)


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_and_prefix_stable():
    a = CD.dataset("train", 400, seed=1)
    assert a == CD.dataset("train", 400, seed=1)
    assert CD.dataset("train", 150, seed=1) == a[:150]
    assert a != CD.dataset("train", 400, seed=2)
    assert CD.dataset("test", 0, seed=1) == []


def test_rows_follow_the_configuration_and_are_distinct():
    task = Countdown(min_numbers=4, max_numbers=5, min_number=2, max_number=30, min_target=10, max_target=200)
    rows = task.dataset("validation", 300, seed=0)
    assert len({key(r) for r in rows}) == 300
    for row in rows:
        assert set(row) >= {"numbers", "target"}
        assert 4 <= len(row["numbers"]) <= 5 and all(2 <= n <= 30 for n in row["numbers"])
        assert 10 <= row["target"] <= 200
    assert json.loads(json.dumps(rows)) == rows
    lengths = {len(r["numbers"]) for r in CD.dataset("train", 300, seed=0)}
    assert lengths == {3, 4}


def test_every_generated_problem_is_solvable_under_the_verifier():
    rows = CD.dataset("train", 1500, seed=3) + CD.dataset("test", 300, seed=3)
    for row in rows:
        expression = solve(row["numbers"], row["target"])
        assert expression is not None, row
        assert CD.reward(answer(expression), row).correct, (row, expression)


def test_splits_are_disjoint_for_any_sizes_and_seeds():
    per_split = {
        split: {key(r) for seed in (0, 1) for r in CD.dataset(split, size, seed)}
        for split, size in (("train", 2000), ("validation", 300), ("test", 300))
    }
    assert not per_split["train"] & per_split["validation"]
    assert not per_split["train"] & per_split["test"]
    assert not per_split["validation"] & per_split["test"]
    for split, keys in per_split.items():
        assert all(split_of(list(numbers), target) == split for numbers, target in keys)


def test_small_configuration_fills_a_split_exactly_or_says_how_many_exist():
    task = Countdown(max_numbers=3, max_number=6, max_target=20)
    space = {
        (numbers, int(value))
        for numbers in itertools.combinations_with_replacement(range(1, 7), 3)
        for value in all_values(numbers)
        if value.denominator == 1 and 1 <= value <= 20
    }
    val = {k for k in space if split_of(list(k[0]), k[1]) == "validation"}
    rows = task.dataset("validation", len(val), seed=5)
    assert {key(r) for r in rows} == val and len(rows) == len(val)
    with pytest.raises(ValueError, match=f"asked for {len(val) + 1} validation problems but only {len(val)} "):
        task.dataset("validation", len(val) + 1, seed=5)
    with pytest.raises(ValueError, match="at most"):
        task.dataset("train", 10**6, seed=0)


def test_cpu_demo_configuration_has_room():
    task = get_task("countdown", max_numbers=3, max_number=20, max_target=50)
    train = task.dataset("train", 4000, seed=0)
    val = task.dataset("validation", 256, seed=0)
    assert len({key(r) for r in train}) == 4000 and not {key(r) for r in train} & {key(r) for r in val}
    # This space holds about 12.8k problems, so 20k training problems cannot exist: say so at once.
    with pytest.raises(TooFewProblems, match=r"asked for 20000 train problems but only \d+ distinct ones exist"):
        task.dataset("train", 20000, seed=0)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"min_numbers": 5, "max_numbers": 4}, "max_numbers"),
        ({"max_numbers": 7}, "max_numbers"),
        ({"min_number": 10, "max_number": 5}, "max_number"),
        ({"min_number": -1}, "min_number"),
        ({"min_target": 50, "max_target": 10}, "max_target"),
        ({"format_score": "0.1"}, "format_score"),
        ({"correct_score": float("nan")}, "correct_score"),
        ({"use_all_numbers": 1}, "use_all_numbers"),
        ({"max_answer_chars": 0}, "max_answer_chars"),
        ({"prompt_style": "short"}, "prompt_style"),
    ],
)
def test_bad_configuration_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"Countdown: {argument} "):
        Countdown(**kwargs)


def test_bad_dataset_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        CD.dataset("dev", 10, 0)
    with pytest.raises(ValueError, match="size"):
        CD.dataset("train", -1, 0)
    with pytest.raises(ValueError, match="seed"):
        CD.dataset("train", 1, "0")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# Prompts and teacher traces
# ---------------------------------------------------------------------------------------------------------------


def test_base_prompt_states_the_rules_and_opens_think():
    row = {"numbers": [25, 3, 2, 6], "target": 50}
    text = CD.prompt(row)
    assert text.endswith("Assistant: Let me solve this step by step.\n<think>")
    assert "User: " in text and "[25, 3, 2, 6]" in text and "equals 50" in text
    assert "exactly once" in text and "+ - * /" in text and "<answer>" in text
    loose = Countdown(use_all_numbers=False).prompt(row)
    assert "at most once" in loose and "exactly once" not in loose


def test_compact_prompt_keeps_the_rules_in_one_line():
    row = {"numbers": [25, 3, 2, 6], "target": 50}
    text = Countdown(prompt_style="compact").prompt(row)
    assert text.endswith("\n<think>") and text.count("\n") == 1 and len(text) < len(CD.prompt(row)) / 4
    assert "25 3 2 6" in text and "50" in text and "each once" in text and "+ - * /" in text
    assert "at most once" in Countdown(prompt_style="compact", use_all_numbers=False).prompt(row)


def test_chat_form_matches_the_base_prompt():
    row = {"numbers": [25, 3, 2, 6], "target": 50}
    messages = CD.messages(row)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] in CD.prompt(row)
    assert CD.chat_prefix.endswith("<think>") and CD.stop == ("</answer>",)


def test_demonstrations_score_correct_and_show_true_arithmetic():
    rows = CD.dataset("train", 400, seed=7)
    missed = 0
    for row in rows:
        demo = CD.demonstration(row)
        assert demo == CD.demonstration(row)  # deterministic
        assert demo.startswith("\n") and "\n</think>\n<answer>" in demo and demo.endswith("</answer>")
        assert CD.reward(demo, row).correct
        think = demo.split("</think>")[0]
        assert len(think) < 400
        assert think.strip().splitlines()[-1].endswith(f"That is {row['target']}.")
        for a, op, b, v in re.findall(r"(\(?-?[\d/]+\)?)([-+*/])(\(?-?[\d/]+\)?)=(-?[\d/]+)", think):
            x, y = Fraction(a.strip("()")), Fraction(b.strip("()"))
            assert {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op] == Fraction(v)
        missed += "is not" in think
    assert 0 < missed < len(rows)  # some traces show a failed attempt first, some go straight to the answer
    assert solve_trace(rows[0]["numbers"], rows[0]["target"]) in CD.demonstration(rows[0])


def test_miss_counts_follow_the_chosen_distribution():
    rows = CD.dataset("train", 3000, seed=3)

    def share_of_misses(task):
        counts = Counter(task.demonstration(r).count(" is not ") for r in rows)
        return {k: counts[k] / len(rows) for k in sorted(counts)}

    uniform = share_of_misses(Countdown(trace_misses=1))
    assert set(uniform) == {0, 1} and abs(uniform[0] - 0.5) < 0.04
    # another miss with chance 0.5, at most 2: shares 1/2, 1/4, 1/4 (a draw that hits the target is dropped)
    geometric = share_of_misses(Countdown(trace_misses=2, trace_miss_chance=0.5))
    assert set(geometric) == {0, 1, 2}
    assert abs(geometric[0] - 0.5) < 0.04 and abs(geometric[1] - 0.25) < 0.04 and abs(geometric[2] - 0.25) < 0.04
    assert set(share_of_misses(Countdown(trace_misses=3, trace_miss_chance=0.0))) == {0}
    for row in rows[:200]:  # every style still ends in the teacher's one solution
        demos = [t.demonstration(row) for t in (CD, Countdown(trace_misses=2, trace_miss_chance=0.5))]
        assert len({d.split("<answer>")[1] for d in demos}) == 1 and all(CD.reward(d, row).correct for d in demos)


def test_target_check_writes_the_target_before_each_verdict():
    checked = Countdown(trace_misses=2, trace_miss_chance=0.5, trace_check="target")
    rows = CD.dataset("train", 300, seed=5)
    misses = 0
    for row in rows:
        demo = checked.demonstration(row)
        assert checked.reward(demo, row).correct and "is not" not in demo and "That is" not in demo
        lines = demo.split("</think>")[0].strip().splitlines()
        assert lines[-1].endswith(f". Want {row['target']}: yes.")
        assert all(line.endswith(f". Want {row['target']}: no.") for line in lines[:-1])
        misses += len(lines) - 1
    assert misses > 0
    with pytest.raises(ValueError, match="trace_check"):
        Countdown(trace_check="loud")


@pytest.mark.parametrize("chance", [1.0, -0.1, True, "half"])
def test_miss_chance_must_be_a_probability(chance):
    with pytest.raises(ValueError, match="trace_miss_chance"):
        Countdown(trace_miss_chance=chance)


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: the verifier never raises, stays fast, and scores within {0, format_score, correct_score}
# ---------------------------------------------------------------------------------------------------------------

TIME_BOUND_S = 0.25  # CPU seconds per completion; the real cost is tens of microseconds

# Cases per fuzz test: 1,500 + 1,500 + 6,500 + 500 = 10,000 in all.

rows_st = st.builds(
    lambda numbers, target: {"numbers": numbers, "target": target},
    st.lists(st.integers(0, 120), min_size=1, max_size=6),
    st.integers(-10, 300),
)

NASTY = [
    "9**9**9", "10**100000", "2**3", "9" * 50 + "**" + "9" * 50, "1.5", ".5", "5.", "1e5", "1E-3", "0x1F",
    "0b11", "1_000", "١٢", "１２", "²", "½", "x", "abs(3)", "__import__('os').system('true')", "None", "nan",
    "inf", "...", "'7'", "[1]", "{}", "lambda:1", "(", ")", "<answer>", "</answer>", "<answer", "answer>", "\x00",
    "\u200b", "  ", "\t", "\n", "\r\n", "-", "+", "*", "/", "//", "%", "^", "=", ",", ";", "~", "&", "|", "!", "<<",
]

atoms = st.one_of(
    st.integers(0, 120).map(str),
    st.sampled_from(NASTY),
    st.text(alphabet="0123456789", min_size=20, max_size=600),  # long digit runs
)
ops = st.sampled_from(["+", "-", "*", "/", "**", "//", "%", "^", "", " ", "\n", "=", ".", ",", "e", "-(-", "+-"])


def _extend(inner):
    return st.one_of(
        st.tuples(inner, ops, inner).map("".join),
        inner.map(lambda e: f"({e})"),
        st.tuples(st.integers(1, 600), inner).map(lambda t: "(" * t[0] + t[1] + ")" * t[0]),  # deep nesting
        st.tuples(st.sampled_from(["-", "+", "--", "*", "/"]), inner).map("".join),
    )


expressions = st.recursive(atoms, _extend, max_leaves=6)


def wrap(style: int, body: str, noise: str, count: int) -> str:
    """Put an answer body into a completion in one of eight shapes."""
    return [
        f"{noise}<answer>{body}</answer>",
        f"<think>{noise}</think>\n<answer>{body}</answer>\n{noise}",
        f"{noise}<answer>{body}",  # unclosed
        "".join(f"<answer>{body[i:]}</answer>{noise}" for i in range(min(count, 30))),  # several answers
        f"<answer><answer>{body}</answer></answer>",
        f"<answer>{body[:50]}</answer>" * count,  # very many tags
        f"{body}{noise}",  # no tag at all
        f"</answer>{body}<answer>{noise}",
    ][style]


@st.composite
def completions(draw, body=expressions):
    return wrap(draw(st.integers(0, 7)), draw(body), draw(st.text(max_size=40)), draw(st.integers(1, 2000)))


def adversarial(rng) -> str:
    """A cheap grammar-driven nasty answer from a seeded generator (the bulk of the fuzz cases)."""
    parts = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.3:
            parts.append(str(rng.randint(0, 120)))
        elif roll < 0.5:
            parts.append(rng.choice(NASTY))
        elif roll < 0.6:
            parts.append("9" * rng.randint(20, 1000))
        elif roll < 0.7:
            depth = rng.randint(1, 1000)
            parts.append("(" * depth + str(rng.randint(0, 99)) + ")" * rng.choice([depth, depth - 1, depth + 1]))
        elif roll < 0.8:
            parts.append(rng.choice("+-*/") * rng.randint(1, 3))
        else:
            parts.append(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x2FFF), 0x0660 + rng.randint(0, 9)])))
    return wrap(rng.randint(0, 7), "".join(parts), "x" * rng.randint(0, 20), rng.randint(1, 2000))


def check_verdict(completion: str, row: dict) -> None:
    gc.disable()  # a collection of the fuzzer's own garbage is not the verifier's time
    try:
        start = time.process_time()  # CPU time: immune to other processes on a shared machine
        r = CD.reward(completion, row)
        elapsed = time.process_time() - start
    finally:
        gc.enable()
    assert elapsed < TIME_BOUND_S, (elapsed, completion[:200])
    assert r.score in SCORES and r.info["reason"] in REASONS
    assert r.correct == (r.score == CD.correct_score) == (r.info["reason"] == "correct")
    assert r.formatted == ("<answer>" in completion)
    if r.correct:
        # Independent check of a verdict of "correct": the answer holds only whitelisted characters, so Python
        # may evaluate it here, with every literal turned into an exact Fraction.
        text = r.info["answer"]
        assert re.fullmatch(r"[0-9+\-*/() \t\r\n]+", text)
        assert sorted(int(n) for n in re.findall(r"[0-9]+", text)) == sorted(row["numbers"])
        exact = re.sub(r"[0-9]+", lambda m: f"Fraction({m.group()})", text)
        assert eval(f"({exact})") == row["target"]  # parentheses let newlines through


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # the time bound is checked per call in check_verdict
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def run_counted(test, expected: int) -> None:
    """Run a @given test and make sure hypothesis really tried ``expected`` cases."""
    calls: list[int] = []
    test(calls)
    assert len(calls) >= expected


def test_fuzz_random_text():
    @fuzz_settings(1500)
    @given(st.one_of(st.text(max_size=400), completions(st.text(max_size=300))), rows_st)
    def run(calls, completion, row):
        calls.append(1)
        check_verdict(completion, row)

    run_counted(run, 1500)


def test_fuzz_adversarial_grammar():
    @fuzz_settings(1500)
    @given(completions(), rows_st)
    def run(calls, completion, row):
        calls.append(1)
        check_verdict(completion, row)

    run_counted(run, 1500)


def test_fuzz_seeded_adversarial_generator():
    @fuzz_settings(6500)
    @given(st.integers(0, 2**64))
    def run(calls, seed):
        calls.append(1)
        rng = random.Random(seed)
        row = {"numbers": [rng.randint(0, 120) for _ in range(rng.randint(1, 6))], "target": rng.randint(-10, 300)}
        check_verdict(adversarial(rng), row)

    run_counted(run, 6500)


POOL = [(row, solve(row["numbers"], row["target"])) for row in CD.dataset("validation", 200, seed=11)]


def test_fuzz_mutated_solutions():
    @fuzz_settings(500)
    @given(
        st.sampled_from(POOL),
        st.integers(0, 40),
        st.sampled_from(["", " ", "\n", "(", ")", "+", "-", "*", "/", "0", "1", "9", ".", "**", "//", "x", "-("]),
        st.booleans(),
    )
    def run(calls, item, at, insert, delete):
        calls.append(1)
        row, expression = item
        at = min(at, len(expression))
        mutated = expression[:at] + insert + expression[at + delete :]
        check_verdict(f"<think>ok</think>\n<answer>{mutated}</answer>", row)

    run_counted(run, 500)


# ---------------------------------------------------------------------------------------------------------------
# Calculator: the environment's words inside completions
# ---------------------------------------------------------------------------------------------------------------


def test_calculator_writes_exact_results_and_the_teachers_verdicts():
    calc = Countdown(calculator=True, prompt_style="compact").feedback
    prompt = Countdown(prompt_style="compact").prompt({"numbers": [6, 13, 10], "target": 17})
    assert calc(prompt, "\nTry 13+10=") == "23"
    assert calc(prompt, "\nTry 13+10=23, 23-6=") == "17"
    assert calc(prompt, "\nTry 13+10=23, 23-6=17.") == " That is 17.\n"
    assert calc(prompt, "\nTry 13+10=23, 23+6=29.") == " 29 is not 17.\n"
    assert calc(prompt, "Try 7/2=") == "7/2" and calc(prompt, "Try 6-(7/2)=") == "5/2" and calc(prompt, "1-9=") == "-8"
    checked = Countdown(calculator=True, trace_check="target").feedback
    assert checked(Countdown().prompt({"numbers": [6, 13, 10], "target": 17}), "Try 13+10=23, 23-6=17.") == " Want 17: yes.\n"
    # the words are the teacher's: a trace written through the calculator is the trace itself
    row = {"numbers": [6, 13, 10], "target": 17}
    demo = Countdown(prompt_style="compact", trace_misses=1).demonstration(row)
    rebuilt, fired = "", 0
    for ch in demo:
        rebuilt += ch
        if ch in calc.triggers and (words := calc(prompt, rebuilt)):
            assert demo[len(rebuilt):].startswith(words)
            fired += 1
    assert fired == 3 * demo.count("Try")  # two results and a verdict per attempt


@pytest.mark.parametrize("text", ["x=", "Try =", "Try 3/0=", "Try (5/0)+1=", "Try 1+2=3/0.", "=.", "", "Try 12.",
                                  "Try 1+2=3." * 50, "9" * 200 + "*" + "9" * 200 + "="])
def test_calculator_ignores_what_it_cannot_read(text):
    calc = Countdown(calculator=True).feedback
    prompt = Countdown().prompt({"numbers": [1, 2, 3], "target": 6})
    words = calc(prompt, text)
    assert words is None or words in (" 3 is not 6.\n", " That is 6.\n") or words.lstrip("-").isdigit()


def test_calculator_is_off_unless_asked():
    assert Countdown().feedback is None
    with pytest.raises(ValueError, match="calculator"):
        Countdown(calculator="yes")
