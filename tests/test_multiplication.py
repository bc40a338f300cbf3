"""Multiplication: the adversarial table of answers that must not pass, the generator, the teacher's long
multiplication, and fuzz tests against an independent oracle (the answer is correct iff it is str(a * b))."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyrl.task import get_task
from tinyrl.tasks.multiplication import EXAMPLE_ANSWER, REASONS, Multiplication, long_multiplication, split_of

MUL = Multiplication()
ROW = {"a": 123, "b": 45}  # 5535


def score(content: str, row: dict = ROW, task: Multiplication = MUL, before: str = "Let me compute. "):
    return task.reward(f"{before}<answer>{content}</answer>", row)


ADVERSARIAL = [
    # (answer content, reason): every one of these is wrong, and says why
    ("123*45", "expression"),
    ("123 x 45", "expression"),
    ("5535-0", "expression"),
    ("(5535)", "expression"),
    ("5535 = 123*45", "expression"),
    ("+5535", "sign"),
    ("-5535", "sign"),
    ("5535.0", "decimal point"),
    ("5.535e3", "decimal point"),
    ("5,535", "digit separator"),
    ("5_535", "digit separator"),  # int() accepts it
    ("5 535", "digit separator"),
    ("5\u00a0535", "digit separator"),
    ("\u0665\u0665\u0663\u0665", "non-ASCII digit"),  # Arabic-Indic 5535: int() accepts it
    ("\uff15\uff15\uff13\uff15", "non-ASCII digit"),  # full-width 5535: int() accepts it
    ("5535\u00b2", "non-ASCII digit"),
    ("0x159f", "expression"),
    ("5535e0", "disallowed character"),
    ("five thousand", "disallowed character"),
    ("05535", "leading zero"),
    ("5536", "wrong product"),
    ("55350", "wrong product"),
    ("", "empty answer"),
    ("   ", "empty answer"),
    ("9" * 10_000, "answer too long"),
]


@pytest.mark.parametrize("content, reason", ADVERSARIAL)
def test_adversarial_answers_are_wrong_for_the_stated_reason(content, reason):
    assert reason in REASONS
    r = score(content)
    assert not r.correct and r.score == MUL.format_score and r.info["reason"] == reason
    assert r.components == {"correct": 0.0, "format": MUL.format_score}


def test_the_exact_product_is_correct_with_whitespace_around_it():
    for content in ("5535", " 5535 ", "\n5535\n"):
        r = score(content)
        assert r.correct and r.score == 1.0 and r.info == {"reason": "correct", "answer": "5535"}
        assert r.components == {"correct": 1.0, "format": 0.0}


def test_last_answer_wins_and_an_unclosed_final_tag_counts():
    assert MUL.reward("<answer>5535</answer> no wait <answer>5536</answer>", ROW).info["reason"] == "wrong product"
    assert MUL.reward("<answer>5536</answer> no wait <answer>5535</answer>", ROW).correct
    assert MUL.reward("<think>5535</think>\n<answer>5535", ROW).correct
    assert MUL.reward("<answer>5535</answer> <answer>", ROW).info["reason"] == "empty answer"
    no_tag = MUL.reward("The product is 5535.", ROW)
    assert no_tag.score == 0.0 and not no_tag.formatted and no_tag.info["reason"] == "no answer"
    assert MUL.reward("<answer>5535</answer>\nThat is my final answer.", ROW).correct


def test_copying_the_prompts_example_answer_earns_nothing_unless_it_is_the_product():
    """The prompt shows `<answer>1234</answer>` as the format; a model that copies it has computed nothing, so it
    must not collect the format bonus (RL on SmolLM2 learned exactly that copy when it did)."""
    assert f"<answer>{EXAMPLE_ANSWER}</answer>" in MUL.messages(ROW)[1]["content"]
    for content in (EXAMPLE_ANSWER, f" {EXAMPLE_ANSWER}\n"):
        r = score(content)
        assert r.score == 0.0 and not r.correct and not r.formatted and r.info["reason"] == "example copied"
        assert r.components == {"correct": 0.0, "format": 0.0}
    assert score("1235").score == MUL.format_score  # any other wrong integer still shows the format
    assert score(EXAMPLE_ANSWER, {"a": 617, "b": 2}).correct  # 617 * 2 = 1234: the right product is right


def test_bad_rows_and_arguments_are_named():
    with pytest.raises(ValueError, match="'a' and 'b'"):
        MUL.reward("<answer>1</answer>", {"a": 1})
    with pytest.raises(ValueError, match="integers"):
        MUL.reward("<answer>1</answer>", {"a": "1", "b": 2})
    with pytest.raises(TypeError, match="completion must be str"):
        MUL.reward(None, ROW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a_digits"):
        get_task("multiplication", a_digits=0)
    with pytest.raises(ValueError, match="prompt_style"):
        get_task("multiplication", prompt_style="tiny")
    with pytest.raises(ValueError, match="only .* distinct ones exist"):
        Multiplication(a_digits=1, b_digits=1).dataset("test", 100, 0)


def test_problems_have_the_digit_counts_and_are_seeded_distinct_and_split_apart():
    task = Multiplication(a_digits=3, b_digits=2)
    train = task.dataset("train", 500, seed=0)
    assert train == task.dataset("train", 500, seed=0) and train != task.dataset("train", 500, seed=1)
    assert task.dataset("train", 100, seed=0) == train[:100]
    assert all(100 <= r["a"] <= 999 and 10 <= r["b"] <= 99 for r in train)
    assert len({(r["a"], r["b"]) for r in train}) == 500
    held_out = {(r["a"], r["b"]) for s in ("validation", "test") for r in task.dataset(s, 200, seed=0)}
    assert not held_out & {(r["a"], r["b"]) for r in train}
    assert all(split_of(r["a"], r["b"]) == "train" for r in train)
    square = Multiplication(a_digits=1, b_digits=1)  # a small space is listed exactly: 45 unordered pairs
    in_test = [(a, b) for a in range(1, 10) for b in range(a, 10) if split_of(a, b) == "test"]
    tests = square.dataset("test", len(in_test), 0)
    assert sorted((min(r["a"], r["b"]), max(r["a"], r["b"])) for r in tests) == in_test
    with pytest.raises(ValueError, match=f"only {len(in_test)} distinct"):
        square.dataset("test", len(in_test) + 1, 0)
    big = Multiplication(a_digits=8, b_digits=7).dataset("train", 50, 0)  # drawn, not listed
    assert all(len(str(r["a"])) == 8 and len(str(r["b"])) == 7 for r in big)


def test_prompts_and_chat_form():
    p = MUL.prompt(ROW)
    assert "Compute 123 * 45" in p and p.endswith("Assistant: <think>") and "<answer>" in p
    assert Multiplication(prompt_style="compact").prompt(ROW) == "Multiply 123 by 45.\n<think>"
    assert [m["role"] for m in MUL.messages(ROW)] == ["system", "user"]
    assert MUL.stop == ("</answer>",)


def test_long_multiplication_traces_are_true_and_score_correct():
    assert long_multiplication(123, 45) == ["123 * 5 = 615", "123 * 40 = 4920", "615 + 4920 = 5535"]
    assert long_multiplication(7, 305) == ["7 * 5 = 35", "7 * 300 = 2100", "35 + 2100 = 2135"]
    assert long_multiplication(9, 0) == ["9 * 0 = 0"]
    task = Multiplication(a_digits=4, b_digits=3)
    for row in task.dataset("validation", 200, seed=3):
        demo = task.demonstration(row)
        assert task.reward(demo, row).correct and demo.endswith(f"<answer>{row['a'] * row['b']}</answer>")
        for step in demo.split("</think>")[0].strip().splitlines():  # every line of working is true arithmetic
            left, right = step.split(" = ")
            x, op, y = left.split(" ")
            assert (int(x) * int(y) if op == "*" else int(x) + int(y)) == int(right)


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: the verifier never raises, always returns one of three scores, and is correct exactly when the content is
# the product written plainly (the oracle below shares no code with the verifier).
# ---------------------------------------------------------------------------------------------------------------

rows_st = st.builds(lambda a, b: {"a": a, "b": b}, st.integers(0, 10**6), st.integers(0, 10**6))
SCORES = {0.0, MUL.format_score, MUL.correct_score}


def oracle(completion: str, row: dict) -> bool:
    start = completion.rfind("<answer>")
    if start < 0:
        return False
    body = completion[start + len("<answer>"):]
    content = body.split("</answer>", 1)[0].strip()
    return content == str(row["a"] * row["b"])


def near_misses(product: int) -> st.SearchStrategy[str]:
    text = str(product)
    variants = st.sampled_from([
        text, f"{text}.0", f"+{text}", f"0{text}", f"{product + 1}", f"{text[:-1]}", f"{text},", f"{text[::-1]}",
        f"{text} ", f"\n{text}\n", "".join(chr(ord(c) + 0xFEE0) for c in text), f"{text[:1]}_{text[1:]}",
    ])
    return variants


def check(completion: str, row: dict) -> None:
    r = MUL.reward(completion, row)
    assert r.score in SCORES and r.info["reason"] in REASONS
    assert r.correct == oracle(completion, row), (completion, row, r)
    assert r.correct == (r.score == MUL.correct_score)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_fuzz_random_text_around_and_inside_answer_tags():
    tags = st.sampled_from(["<answer>", "</answer>", "<think>", "</think>", "\n", " "])
    pieces = st.lists(st.one_of(st.text(max_size=30), tags, st.integers(0, 10**12).map(str)), max_size=12)

    @fuzz_settings(1500)
    @given(pieces.map("".join), rows_st)
    def run(completion, row):
        check(completion, row)

    run()


def test_fuzz_near_misses_of_the_product():
    @fuzz_settings(1500)
    @given(rows_st.flatmap(lambda row: st.tuples(st.just(row), near_misses(row["a"] * row["b"]))),
           st.sampled_from(["", "<think>working</think>\n", "<answer>0</answer> retry "]),
           st.sampled_from(["</answer>", "", "</answer> done"]))
    def run(row_and_answer, before, after):
        row, answer = row_and_answer
        check(f"{before}<answer>{answer}{after}", row)

    run()


def test_fuzz_seeded_mutations_of_true_answers():
    rng = random.Random(0)
    alphabet = "0123456789 +-*.,_e\u0665\uff11()"
    for _ in range(3000):
        row = {"a": rng.randrange(10**6), "b": rng.randrange(10**6)}
        text = list(str(row["a"] * row["b"]))
        for _ in range(rng.randrange(3)):
            at = rng.randrange(len(text) + 1)
            if rng.random() < 0.5 and text:
                del text[min(at, len(text) - 1)]
            else:
                text.insert(at, rng.choice(alphabet))
        check(f"<answer>{''.join(text)}</answer>", row)
