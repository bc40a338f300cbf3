import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrl.evaluate import eval_metrics, pass_at_k, summarize_eval, write_eval_results
from tinyrl.task import Reward


def reward(correct: bool, formatted: bool = True, score: float | None = None) -> Reward:
    if score is None:
        score = 1.0 if correct else (0.1 if formatted else 0.0)
    return Reward(score=score, correct=correct, formatted=formatted, info={})


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(1 for subset in subsets if any(i < c for i in subset))
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # c/n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 1, 0.0),
        (5, 0, 5, 0.0),
        (5, 3, 3, 1.0),  # n - c = 2 < k: every 3-subset holds a correct one
        (5, 5, 1, 1.0),
        (10, 1, 10, 1.0),
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
    ],
)
def test_pass_at_k_hand_checked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_enumeration_of_subsets(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_accepts_numpy_counts():
    correct = np.array([True, False, True, False, False])
    assert pass_at_k(np.int64(correct.size), correct.sum(), 2) == pytest.approx(0.7)


def test_pass_at_k_is_stable_for_large_n():
    # C(2000, 1000) overflows a float; the product form does not need it.
    exact = 1 - Fraction(math.comb(1990, 1000), math.comb(2000, 1000))
    assert pass_at_k(2000, 10, 1000) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((5, 6, 1), "c"),
        ((5, -1, 1), "c"),
        ((5, 2, 0), "k"),
        ((5, 2, 6), "k"),
        ((0, 0, 1), "n"),
        ((5, 2.0, 1), "c must be an int"),
    ],
)
def test_pass_at_k_rejects_bad_arguments(args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        pass_at_k(*args)


def test_summary_keeps_format_bonus_out_of_accuracy():
    greedy = [reward(True), reward(False, formatted=True), reward(False, formatted=True), reward(False, False)]
    summary = summarize_eval(greedy, None, ks=[], response_lengths=[10, 20, 30, 100])
    assert summary["n_problems"] == 4
    assert summary["accuracy"] == 0.25
    assert summary["mean_reward"] == pytest.approx((1.0 + 0.1 + 0.1 + 0.0) / 4)
    assert summary["format_rate"] == 0.75
    assert summary["pass@k"] == {}
    assert summary["response_length_mean"] == 40.0
    assert summary["response_length_median"] == 25.0
    assert (summary["response_length_min"], summary["response_length_max"]) == (10, 100)


def test_summary_pass_at_k_averages_per_problem_estimates():
    greedy = [reward(False), reward(True)]
    sampled = [
        [reward(True), reward(True), reward(False), reward(False), reward(False)],  # n=5, c=2
        [reward(False)] * 5,  # n=5, c=0
    ]
    summary = summarize_eval(greedy, sampled, ks=[1, 2])
    assert summary["pass@k"][1] == pytest.approx((0.4 + 0.0) / 2)
    assert summary["pass@k"][2] == pytest.approx((0.7 + 0.0) / 2)
    assert summary["sampled_accuracy"] == pytest.approx(0.2)
    assert summary["accuracy"] == 0.5
    metrics = eval_metrics(summary)
    assert metrics["eval/accuracy"] == 0.5
    assert metrics["eval/pass@1"] == pytest.approx(0.2)
    assert metrics["eval/pass@2"] == pytest.approx(0.35)
    assert all(isinstance(v, float) for v in metrics.values())


def test_summary_errors_name_the_problem():
    greedy = [reward(True), reward(False)]
    with pytest.raises(ValueError, match="needs rewards_sampled"):
        summarize_eval(greedy, None, ks=[1])
    with pytest.raises(ValueError, match="problem 1 has 2"):
        summarize_eval(greedy, [[reward(True)] * 4, [reward(True)] * 2], ks=[4])
    with pytest.raises(ValueError, match="same problems"):
        summarize_eval(greedy, [[reward(True)]], ks=[1])
    with pytest.raises(ValueError, match="empty"):
        summarize_eval([], None, ks=[])
    with pytest.raises(ValueError, match="response_lengths"):
        summarize_eval(greedy, None, ks=[], response_lengths=[3])
    with pytest.raises(TypeError, match=r"rewards_greedy\[1\]"):
        summarize_eval([reward(True), 1.0], None, ks=[])


def test_write_eval_results_is_strict_json_with_scored_samples(tmp_path):
    greedy = [reward(True), reward(False, score=float("nan"))]
    summary = summarize_eval(greedy, [[reward(True), reward(False)], [reward(False)] * 2], ks=[1, 2])
    path = write_eval_results(
        tmp_path, 30, summary, ["p0", "p1"], ["<answer>3</answer>", "no idea"], greedy, max_samples=1
    )
    assert path == tmp_path / "eval" / "step_00000030.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    assert "NaN" not in path.read_text(encoding="utf-8")
    assert record["step"] == 30
    assert record["summary"]["pass@k"] == {"1": pytest.approx(0.25), "2": pytest.approx(0.5)}
    assert record["summary"]["mean_reward"] == 1.0  # a NaN score is a reward that does not apply: left out
    assert record["samples"] == [
        {"prompt": "p0", "completion": "<answer>3</answer>", "score": 1.0, "correct": True, "formatted": True}
    ]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["step_00000030.json"]
    with pytest.raises(ValueError, match="same length"):
        write_eval_results(tmp_path, 31, summary, ["p0"], ["a", "b"], greedy)
