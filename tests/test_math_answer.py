"""Free-form math answers with math-verify: equivalent forms accepted, wrong ones refused, and input known to make
sympy hang or raise (huge exponents, power towers, giant factorials, deep nesting, malformed LaTeX) bounded by the
verifier's screen and by the reward workers' limits; a fuzz test over LaTeX-like text in real workers."""

from __future__ import annotations

import random
import time

import pytest

pytest.importorskip("math_verify")  # the `math` extra (pip install 'tinyrl[math]'); CI installs it

from tinyrl.data import write_rows  # noqa: E402
from tinyrl.reward_workers import RewardScorer  # noqa: E402
from tinyrl.task import get_task  # noqa: E402
from tinyrl.tasks.math_answer import REASONS, extract_final_answer, unsafe_reason  # noqa: E402

GOLDS = ["72", "\\frac{1}{2}", "1000", "She pays 3 + 4 = 7 dollars.\n#### 7",
         "So the height is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "x^2+1", "-3", "\\pi"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("math") / "problems.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Problem {i}"}], "reward_model": {"ground_truth": g}, "id": i}
            for i, g in enumerate(GOLDS)]
    write_rows(path, rows)
    built = get_task("math", train_file=str(path))
    built.prepare_worker()
    return built


@pytest.fixture(scope="module")
def rows(task):
    return {r["id"]: r for r in task.dataset("train", len(GOLDS), 0)}


EQUIVALENT = [  # (gold index, completion): each is correct
    (0, "The answer is \\boxed{72}."),
    (0, "so 70 + 2 = 72\n#### 72"),
    (0, "<answer>72</answer>"),
    (0, "\\boxed{72.0}"),
    (1, "\\boxed{0.5}"),
    (1, "\\boxed{\\frac{2}{4}}"),
    (2, "#### 1,000"),
    (3, "3 + 4 = 7\n#### 7"),
    (4, "\\boxed{\\frac{\\sqrt3}{2}}"),
    (5, "\\boxed{1 + x^2}"),
    (6, "\\boxed{-3}"),
    (7, "\\boxed{\\pi}"),
    (0, "first \\boxed{71}, then rechecked: \\boxed{72}"),  # the last one counts
]

WRONG = [  # (gold index, completion, reason)
    (0, "\\boxed{71}", "wrong answer"),
    (0, "\\boxed{72} hmm, no: \\boxed{73}", "wrong answer"),
    (1, "\\boxed{0.51}", "wrong answer"),
    (5, "\\boxed{x^2 - 1}", "wrong answer"),
    (0, "It is 72.", "no answer"),
    (0, "\\boxed{}", "empty answer"),
    (0, "\\boxed{" + "7" * 300 + "}", "answer too long"),
    (0, "#### seventy-two", "wrong answer"),
]


@pytest.mark.parametrize("gold, completion", EQUIVALENT)
def test_equivalent_answers_are_correct(task, rows, gold, completion):
    r = task.reward(completion, rows[gold])
    assert r.correct and r.score == 1.0 and r.info["reason"] == "correct", r
    assert r.components == {"correct": 1.0, "format": 0.0}


@pytest.mark.parametrize("gold, completion, reason", WRONG)
def test_wrong_answers_are_wrong(task, rows, gold, completion, reason):
    r = task.reward(completion, rows[gold])
    assert not r.correct and r.score == 0.0 and r.info["reason"] == reason, r
    assert r.formatted == (reason != "no answer")


HOSTILE = [  # known to hang sympy (in C, where no Python timer reaches) or to make it raise
    "\\boxed{2^{2^{100}}}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{2**2**2**2**2**2}",
    "\\boxed{99999999999999^{99999999999}}",
    "\\boxed{((10^{1000})^{1000})^{1000}}",
    "\\boxed{(1+x)^{100000}}",
    "\\boxed{(1+x)^{100}(1+y)^{100}}",
    "\\boxed{9!!!!!!}",
    "\\boxed{100000000!}",
    "\\boxed{(10!)!}",
    "\\boxed{2^{10!}}",
    "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
    "\\boxed{" + "\\frac{1}{" * 60 + "2" + "}" * 60 + "}",
    "\\boxed{\\sum_{n=1}^{10^{12}} n}",
    "\\boxed{\\int_0^1 e^{x^{x^{x}}} dx}",
    "\\boxed{\\lim_{n\\to\\infty} n^{1/n}}",
    "\\boxed{\\binom{10^{9}}{5\\cdot 10^{8}}}",
]

MALFORMED = [  # must score as a wrong answer, not raise
    "\\boxed{\\frac{1}{",
    "\\boxed{\\sqrt[}",
    "\\boxed{\\left( 1 + 2}",
    "\\boxed{\\begin{matrix} 1 & 2}",
    "\\boxed{}}}}}{{{",
    "\\boxed{\\frac}",
    "\\boxed{^^^^}",
    "\\boxed{1/0}",
    "\\boxed{0^0}",
    "\\boxed{\\infty - \\infty}",
    "\\boxed{\x00\x01\x02}",
    "\\boxed{\ud7ff\ue000\U0010ffff}",
    "#### " + "1" * 150,
]


@pytest.mark.parametrize("completion", HOSTILE)
def test_input_that_would_hang_sympy_is_refused_before_parsing(task, rows, completion):
    start = time.monotonic()
    r = task.reward(completion, rows[0])  # in this process, with no time limit: the screen must stop it
    assert time.monotonic() - start < 10.0, "a hang guard, far above the milliseconds this takes"
    assert not r.correct and r.info["reason"] in ("unsafe expression", "answer too long"), r


@pytest.mark.parametrize("completion", MALFORMED)
def test_malformed_latex_is_a_wrong_answer(task, rows, completion):
    r = task.reward(completion, rows[0])
    assert not r.correct and r.info["reason"] in REASONS, r


def test_hostile_and_malformed_input_in_workers_stays_within_the_limits(task, rows):
    completions = HOSTILE + MALFORMED + ["\\boxed{72}"] + ["x" * 1_000_000 + "\\boxed{72}"]
    with RewardScorer(task, workers=2, timeout=5.0, cpu_s=10.0, memory_mb=2048) as scorer:
        rewards = scorer.score(completions, [rows[0]] * len(completions))
        assert scorer.stats["worker_restarts"] == 0 and scorer.stats["timeouts"] == 0
    assert [r.correct for r in rewards] == [False] * (len(HOSTILE) + len(MALFORMED)) + [True, True]
    assert all("error" not in r.info for r in rewards)


def test_ground_truths_are_checked_when_the_file_is_read(tmp_path):
    for truth, message in [("", "holds no answer"), ("\\boxed{2^{2^{64}}}", "cannot be checked safely.*power tower"),
                           ("1" * 500, "has an answer longer than max_answer_chars=200")]:
        path = write_rows(tmp_path / "bad.jsonl", [{"prompt": "q", "reward_model": {"ground_truth": "1"}},
                                                   {"prompt": "q", "reward_model": {"ground_truth": truth}}])
        with pytest.raises(ValueError, match=f"bad.jsonl: row 1: column 'reward_model.ground_truth' {message}"):
            get_task("math", train_file=str(path))
    with pytest.raises(TypeError, match="unknown argument.*compute_score"):
        get_task("math", train_file=str(path), compute_score="scores.py:f")  # math scores answers itself


def test_plain_gsm8k_columns(tmp_path):
    path = write_rows(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}])
    task = get_task("math", train_file=str(path), prompt_key="question", answer_key="answer",
                    instruction="Put the final answer after ####.")
    (row,) = task.dataset("train", 1, 0)
    assert task.prompt(row) == "Tom has 3 apples and buys 4. How many? Put the final answer after ####."
    assert task.gold(row["answer"]) == "7" and task.reward("#### 7", row).correct


def test_extraction_and_screen_are_bounded_on_long_text():
    text = "\\boxed{" * 50_000 + "1"
    start = time.monotonic()
    assert extract_final_answer(text, 200) is not None
    assert unsafe_reason("(" * 100_000, 12, 10_000) == "nested deeper than 12"
    assert time.monotonic() - start < 10.0  # a hang guard: both are linear in the text


def latex_like(rng: random.Random) -> str:
    atoms = ["1", "2", "10", "x", "y", "\\pi", "e", "0.5", "999", "12345"]
    ops = ["+", "-", "*", "/", "^", "**", "!", "\\cdot", "=", ","]
    wraps = ["{}", "()", "\\frac{}{1}", "\\sqrt{}", "\\left(\\right)", "\\text{}", "^{}", "_{}"]
    out = rng.choice(atoms)
    for _ in range(rng.randrange(1, 12)):
        roll = rng.random()
        if roll < 0.45:
            out += rng.choice(ops) + rng.choice(atoms)
        elif roll < 0.8:
            w = rng.choice(wraps)
            cut = w.index("}") if "}" in w else w.index(")")
            out = w[:cut] + out + w[cut:]
        else:
            at = rng.randrange(len(out) + 1)
            out = out[:at] + rng.choice(["{", "}", "(", ")", "^", "!", "\\", " "]) + out[at:]
    return out


def test_fuzz_latex_like_answers_in_workers(task, rows):
    rng = random.Random(0)
    answers = [latex_like(rng) for _ in range(400)]
    completions = [rng.choice(["\\boxed{%s}", "#### %s", "<answer>%s</answer>", "so %s"]) % a for a in answers]
    gold_rows = [rows[rng.randrange(len(GOLDS))] for _ in completions]
    with RewardScorer(task, workers=2, timeout=5.0, cpu_s=10.0, memory_mb=2048) as scorer:
        rewards = scorer.score(completions, gold_rows)
    # Bounded: everything finished; failures, if any, are limits doing their job, never a crash of the verifier.
    for completion, r in zip(completions, rewards):
        assert r.score in (0.0, 1.0) and r.correct == (r.score == 1.0)
        assert "error" not in r.info or r.info["error"] == "timeout", (completion, r.info)
        if "error" not in r.info:
            assert r.info["reason"] in REASONS
    assert sum("error" in r.info for r in rewards) <= 2, "the screen should stop nearly all slow inputs itself"
