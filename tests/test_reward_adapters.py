"""TRL reward functions and veRL compute_score functions used unchanged: the calling conventions, trl.rewards as
shipped in the pinned TRL, weights and None, and every way such code can fail, scored in real worker processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tinyrl.data import write_rows
from tinyrl.reward_workers import RewardScorer
from tinyrl.task import get_task

WILD = str(Path(__file__).with_name("rewards_in_the_wild.py"))


def verl_rows(n: int = 6) -> list[dict]:
    return [
        {
            "data_source": "toy/sums",
            "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": f"What is {i} + {i}?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {"split": "train", "index": i},
            "row_id": i,
        }
        for i in range(n)
    ]


def plain_rows(n: int = 6) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}? Answer in \\boxed{{}}.", "ground_truth": str(2 * i), "row_id": i,
             "solution": f"${2 * i}$"} for i in range(n)]


@pytest.fixture
def verl_file(tmp_path) -> str:
    return str(write_rows(tmp_path / "verl.parquet", verl_rows()))


@pytest.fixture
def plain_file(tmp_path) -> str:
    return str(write_rows(tmp_path / "plain.parquet", plain_rows()))


def score(task, completions, rows, ids=None, workers=1):
    with RewardScorer(task, workers=workers, timeout=20.0) as scorer:
        return scorer.score(completions, rows, ids)


# ---------------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------------


def test_trl_functions_are_called_as_grpo_trainer_calls_them(verl_file, plain_file, tmp_path, monkeypatch):
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RECORD_CALLS", str(record))  # spawned workers inherit the environment
    chat = get_task("file", train_file=verl_file, reward_funcs=[f"{WILD}:record_call"])
    plain = get_task("file", train_file=plain_file, reward_funcs=[f"{WILD}:record_call"])
    chat_row, plain_row = chat.dataset("train", 6, 0)[0], plain.dataset("train", 6, 0)[0]
    (chat_reward,) = score(chat, ["<think>a</think> 4"], [chat_row], [[5, 6, 7]])
    (plain_reward,) = score(plain, ["\\boxed{4}"], [plain_row], [[8]])
    first, second = [json.loads(line) for line in record.read_text().splitlines()]

    # Conversational data: prompts are the rows' messages, completions one assistant message each.
    assert first["prompts"] == [chat_row["prompt"]]
    assert first["completions"] == [[{"role": "assistant", "content": "<think>a</think> 4"}]]
    assert first["completion_ids"] == [[5, 6, 7]]
    # Every other dataset column, as a list with one entry per completion; trainer_state None (no TRL trainer).
    assert first["columns"] == {k: [v] for k, v in chat_row.items() if k != "prompt"}
    assert first["trainer_state"] == "None" and first["callables"] == ["log_extra", "log_metric"]
    # Standard data: plain strings.
    assert second["prompts"] == [plain_row["prompt"]] and second["completions"] == ["\\boxed{4}"]
    assert second["columns"] == {k: [v] for k, v in plain_row.items() if k != "prompt"}

    for reward in (chat_reward, plain_reward):
        # no function is named the correctness or format signal: the reward says nothing about either
        assert reward.score == 0.5 and reward.correct is None and reward.formatted is None
        assert reward.components == {"record_call": 0.5, "recorded": 1.0}  # log_metric values are components too
        assert reward.info["extra"] == {"note": "seen"}


def test_functions_shipped_in_trl_rewards_work_as_they_are(verl_file, plain_file):
    chat = get_task(
        "file", train_file=verl_file, reward_funcs=[
            "trl.rewards.think_format_reward",
            {"path": "trl.rewards:get_soft_overlong_punishment", "kwargs": {"max_completion_len": 10,
                                                                           "soft_punish_cache": 5}},
            {"path": "trl.rewards:get_repetition_penalty_reward", "kwargs": {"ngram_size": 2}},
        ], reward_weights=[1.0, 0.5, 0.25], formatted_from="think_format_reward",
    )
    row = chat.dataset("train", 1, 0)[0]
    good, bad = score(chat, ["<think>\nsum\n</think>\n4", "4"], [row, row], [[1, 2, 3], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert good.components == {"think_format_reward": 1.0, "soft_overlong_punishment_reward": 0.0,
                               "repetition_penalty_reward": 0.0}
    assert good.score == 1.0 and good.formatted and good.correct is None
    # 8 tokens: (10 - 5 - 8) / 5 = -0.6 overlong; 2-grams all the same: (1 - 1/7) * -1 repetition.
    assert bad.components["think_format_reward"] == 0.0
    assert bad.components["soft_overlong_punishment_reward"] == pytest.approx(-0.6)
    assert bad.components["repetition_penalty_reward"] == pytest.approx(-6 / 7)
    assert bad.score == pytest.approx(0.5 * -0.6 + 0.25 * -6 / 7) and bad.formatted is False


def test_trl_accuracy_reward_uses_math_verify_in_the_workers(plain_file):
    pytest.importorskip("math_verify")  # the `math` extra; CI installs it
    task = get_task("file", train_file=plain_file, prompt_key="prompt",
                    reward_funcs=["trl.rewards:accuracy_reward"])
    rows = sorted(task.dataset("train", 6, 0), key=lambda r: r["row_id"])
    row = rows[3]  # solution "$6$"
    # accuracy_reward expects conversational completions; this file's prompts are plain text, so TRL would pass
    # strings and the function fails the same way it does under GRPOTrainer: an error, shown, scoring 0.
    (reward,) = score(task, ["\\boxed{6}"], [row])
    assert reward.score == 0.0 and "TypeError" in reward.info["error"] and "accuracy_rewards.py" in reward.info["where"]

    chat_rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "solution": r["solution"]} for r in rows]
    chat_file = write_rows(Path(plain_file).with_name("chat.jsonl"), chat_rows)
    chat = get_task("file", train_file=str(chat_file), reward_funcs=["trl.rewards:accuracy_reward"],
                    correct_from="accuracy_reward")
    right, wrong, equivalent = score(chat, ["so \\boxed{6}", "so \\boxed{7}", "so \\boxed{\\frac{12}{2}}"],
                                     [chat_rows[3]] * 3)
    assert (right.score, wrong.score, equivalent.score) == (1.0, 0.0, 1.0)
    assert right.correct and not wrong.correct and right.components == {"accuracy_reward": 1.0}


def test_weights_and_functions_that_do_not_apply(verl_file):
    task = get_task("file", train_file=verl_file, reward_funcs=[f"{WILD}:length_reward", f"{WILD}:only_even_rows"],
                    reward_weights=[2.0, 1.0])
    rows = sorted(task.dataset("train", 6, 0), key=lambda r: r["row_id"])
    even, odd = score(task, ["abc", "abc"], rows[:2])
    assert even.score == pytest.approx(2 * 0.25 + 1.0) and even.components == {"length_reward": 0.25,
                                                                               "only_even_rows": 1.0}
    assert odd.score == pytest.approx(2 * 0.25) and odd.components == {"length_reward": 0.25}  # None is skipped
    nobody = get_task("file", train_file=verl_file, reward_funcs=[f"{WILD}:only_even_rows"])
    (skipped,) = score(nobody, ["abc"], [rows[1]])
    # TRL's "not applicable": NaN, so that it stays out of its group's statistics (see test_not_applicable.py)
    assert math.isnan(skipped.score) and not skipped.applies and skipped.correct is None
    assert "returned None" in skipped.info["not_applicable"]
    assert skipped.components == {} and "error" not in skipped.info


@pytest.mark.parametrize(
    "func, message",
    [("wrong_length_reward", "expected a list with one value"), ("nan_reward", "not a finite number"),
     ("divides_by_zero", "ZeroDivisionError: division by zero")],
)
def test_trl_function_failures_score_zero_with_the_error(verl_file, func, message):
    task = get_task("file", train_file=verl_file, reward_funcs=[f"{WILD}:{func}"])
    (reward,) = score(task, ["x"], task.dataset("train", 1, 0))
    assert reward.score == 0.0 and message in reward.info["error"] and "Traceback" in reward.info["traceback"]


def test_reward_specs_are_checked_when_the_task_is_built(verl_file):
    with pytest.raises(ValueError, match=r"reward_funcs\[0\].*cannot import module 'no_such_pkg.rewards'"):
        get_task("file", train_file=verl_file, reward_funcs=["no_such_pkg.rewards:f"])
    with pytest.raises(ValueError, match=r"reward_funcs\[1\].*has no attribute 'nope'"):
        get_task("file", train_file=verl_file, reward_funcs=[f"{WILD}:format_reward", f"{WILD}:nope"])
    with pytest.raises(FileNotFoundError, match="missing.py"):
        get_task("file", train_file=verl_file, compute_score="missing.py:compute_score")
    with pytest.raises(ValueError, match="2 weight.*1 reward function"):
        get_task("file", train_file=verl_file, reward_funcs=[f"{WILD}:format_reward"], reward_weights=[1, 2])
    with pytest.raises(ValueError, match="one way of scoring"):
        get_task("file", train_file=verl_file, reward_funcs=[f"{WILD}:format_reward"],
                 compute_score=f"{WILD}:compute_score")
    with pytest.raises(ValueError, match="'path'"):
        get_task("file", train_file=verl_file, reward_funcs=[{"kwargs": {}}])


# ---------------------------------------------------------------------------------------------------------------
# veRL
# ---------------------------------------------------------------------------------------------------------------


def test_verl_compute_score_gets_source_answer_and_extra_info(verl_file):
    task = get_task("file", train_file=verl_file, compute_score=f"{WILD}:compute_score")
    row = next(r for r in task.dataset("train", 6, 0) if r["row_id"] == 4)
    right, near, none = score(task, ["8 + 0\n#### 8", "#### 9", "eight"], [row] * 3)
    assert (right.score, near.score, none.score) == (1.0, 0.1, 0.0)
    assert right.correct and not near.correct


def test_verl_dict_results_log_their_keys(verl_file):
    task = get_task("file", train_file=verl_file, compute_score=f"{WILD}:compute_score_dict")
    row = next(r for r in task.dataset("train", 6, 0) if r["row_id"] == 2)
    right, wrong = score(task, ["it is 4", "it is 5"], [row, row])
    assert right.score == 2.0 and right.correct and right.components == {"acc": 1.0, "length": 7.0}
    assert right.info == {"pred": " is 4", "source_seen": "toy/sums"}
    assert wrong.score == 0.0 and not wrong.correct  # acc decides correctness
    missing = get_task("file", train_file=verl_file, compute_score=f"{WILD}:compute_score_without_score")
    (failed,) = score(missing, ["x"], [row])
    assert "without a 'score' key" in failed.info["error"]


def test_verl_functions_get_only_the_arguments_they_take(plain_file):
    task = get_task("file", train_file=plain_file, answer_key="ground_truth",
                    compute_score=f"{WILD}:compute_score_two_args")
    row = next(r for r in task.dataset("train", 6, 0) if r["row_id"] == 5)
    assert [r.score for r in score(task, ["10", "11"], [row, row])] == [1.0, 0.0]
