"""Reward workers under their limits (memory, CPU time), with real runaway rewards in real worker processes; the
checks on what a reward returns; token ids reaching rewards that ask for them; the defaults a task may leave out.

The tasks live at module level so that spawned workers can import this module and rebuild them.
"""

from __future__ import annotations

import os
import re
import sys
import time

import pytest

from tinyrl.reward_workers import RewardScorer, score_batch
from tinyrl.task import Reward, complete_task, get_task

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and RLIMIT_CPU are enforced on Linux")


class RunawayTask:
    """Only what a task cannot do without; the reward misbehaves as the completion says."""

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        return [{"i": i} for i in range(size)]

    def prompt(self, row: dict) -> str:
        return f"item {row['i']}"

    def reward(self, completion: str, row: dict) -> Reward:
        if completion == "hoard":  # allocates without bound, 64 MB at a time
            hoard = []
            while True:
                hoard.append(bytearray(64 << 20))
        if completion == "huge":  # one allocation far beyond any limit
            return Reward(float(len(b"x" * (1 << 40))), True, True)
        if completion == "pow":  # one C call (big-integer power) that takes minutes; no signal handler runs inside
            return Reward(float(pow(7, 10**9, None) % 2), True, True)
        if completion == "regex":  # catastrophic backtracking inside the C regex engine
            return Reward(float(bool(re.match(r"(a+)+$", "a" * 40 + "b"))), True, True)
        if completion == "nan":
            return Reward(float("nan"), True, True)
        if completion == "bad component":
            return Reward(1.0, True, True, {}, {"part": "high"})
        return Reward(float(len(completion)), True, True, {"pid": os.getpid()}, {"length": float(len(completion))})


class TokenTask(RunawayTask):
    def reward(self, completion: str, row: dict, completion_ids=None) -> Reward:
        return Reward(float(sum(completion_ids or [])), True, True)


@pytest.fixture(scope="module")
def limited():
    # A generous wall clock, so that what stops a runaway reward is the limit under test, not the parent's kill.
    with RewardScorer(RunawayTask(), workers=1, timeout=60.0, cpu_s=1.0, memory_mb=256) as scorer:
        yield scorer


def test_a_reward_that_allocates_without_bound_scores_zero_and_its_worker_is_replaced(limited):
    before = dict(limited.stats)
    first_pid = limited._pool[0].process.pid
    start = time.monotonic()
    rewards = limited.score(["ab", "hoard", "abc", "huge", "abcd"], [{"i": i} for i in range(5)])
    assert time.monotonic() - start < 30
    assert [r.score for r in rewards] == [2.0, 0.0, 3.0, 0.0, 4.0]
    for r in (rewards[1], rewards[3]):
        assert r.info["error"].startswith("MemoryError") and "memory limit" in r.info["error"]
        assert "Traceback" in r.info["traceback"] and r.info["where"].startswith("test_reward_workers.py:")
    assert limited.stats["errors"] - before["errors"] == 2
    # A worker that ran out of memory finishes its chunk, then a fresh process replaces it.
    assert limited.stats["worker_restarts"] - before["worker_restarts"] >= 1
    assert limited._pool[0].process.pid != first_pid
    again = limited.score(["xyz"], [{"i": 0}])
    assert again[0].score == 3.0 and again[0].info["pid"] == limited._pool[0].process.pid


@pytest.mark.parametrize("runaway", ["pow", "regex"])
def test_a_reward_spinning_in_c_code_is_stopped_by_the_cpu_limit(limited, runaway):
    before = dict(limited.stats)
    start = time.monotonic()
    rewards = limited.score(["a", runaway, "bb"], [{"i": i} for i in range(3)])
    elapsed = time.monotonic() - start
    assert elapsed < 30, "the 60 s wall clock would have fired later; the CPU limit must stop it first"
    assert [rewards[0].score, rewards[2].score] == [1.0, 2.0]
    assert rewards[1].score == 0.0 and "SIGXCPU" in rewards[1].info["error"]
    assert "CPU time limit of 1 s" in rewards[1].info["error"]
    assert limited.stats["worker_restarts"] - before["worker_restarts"] == 1
    assert limited.score(["ok"], [{"i": 0}])[0].score == 2.0


def test_non_finite_scores_and_bad_components_are_errors(limited):
    rewards = limited.score(["nan", "bad component", "abc"], [{"i": i} for i in range(3)])
    assert rewards[0].score == 0.0 and "not finite" in rewards[0].info["error"]
    assert rewards[1].score == 0.0 and "components map names to numbers" in rewards[1].info["error"]
    assert rewards[2].components == {"length": 3.0}
    in_process = score_batch(RunawayTask(), ["nan"], [{"i": 0}], workers=0)
    assert "not finite" in in_process[0].info["error"]


def test_errors_reach_the_callback_with_their_rows():
    seen = []
    with RewardScorer(RunawayTask(), workers=0, on_errors=lambda c, r, w: seen.append((c, r, w))) as scorer:
        scorer.score(["fine"], [{"i": 0}])
        assert seen == []
        scorer.score(["nan", "ok"], [{"i": 5}, {"i": 6}])
    ((completions, rows, rewards),) = seen
    assert completions == ["nan", "ok"] and rows == [{"i": 5}, {"i": 6}] and "error" in rewards[0].info


def test_token_ids_reach_rewards_that_take_them():
    ids = [[1, 2, 3], [10], []]
    with RewardScorer(TokenTask(), workers=1, timeout=5.0) as scorer:
        assert [r.score for r in scorer.score(["a", "b", "c"], [{"i": 0}] * 3, ids)] == [6.0, 10.0, 0.0]
    # A reward without the keyword is called as before, token ids or not.
    plain = score_batch(RunawayTask(), ["abc"], [{"i": 0}], workers=0)
    assert plain[0].score == 3.0


def test_a_task_needs_only_dataset_prompt_and_reward(tmp_path):
    task = complete_task(RunawayTask())
    assert task.name == "runaway_task" and task.stop == () and task.chat_prefix == ""
    assert task.messages({"i": 3}) == [{"role": "user", "content": "item 3"}]
    assert task.prompt({"i": 3}) == "item 3" and task.dataset("train", 2, 0) == [{"i": 0}, {"i": 1}]
    # The wrapper crosses into worker processes like the task itself.
    assert [r.score for r in score_batch(task, ["abcd"], [{"i": 0}], workers=1)] == [4.0]

    source = tmp_path / "chat_only.py"
    source.write_text(
        "from tinyrl.task import Reward\n"
        "class ChatOnly:\n"
        "    def dataset(self, split, size, seed):\n        return [{'q': 'hi'}] * size\n"
        "    def messages(self, row):\n"
        "        return [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': row['q']}]\n"
        "    def reward(self, completion, row):\n        return Reward(1.0, True, True)\n"
    )
    chat_only = get_task(f"{source}:ChatOnly")
    assert chat_only.name == "chat_only" and chat_only.prompt({"q": "hi"}) == "Be brief.\n\nhi"
    with pytest.raises(TypeError, match="lacks Task member.*reward"):
        complete_task(type("NoReward", (), {"dataset": lambda s, *a: [], "prompt": lambda s, r: ""})())
    with pytest.raises(TypeError, match="prompt or messages"):
        complete_task(type("NoPrompt", (), {"dataset": lambda s, *a: [], "reward": lambda s, c, r: None})())


def test_limit_arguments_are_checked():
    with pytest.raises(ValueError, match="memory_mb"):
        RewardScorer(RunawayTask(), workers=0, memory_mb=-1)
    with pytest.raises(ValueError, match="cpu_s"):
        RewardScorer(RunawayTask(), workers=0, cpu_s=float("inf"))


@pytest.mark.parametrize(
    "override, key",
    [("task.reward_error_limit=0", "task.reward_error_limit"), ("task.reward_error_limit=1.5", "task.reward_error_limit"),
     ("task.reward_cpu_s=-1", "task.reward_cpu_s"), ("task.reward_memory_mb=-5", "task.reward_memory_mb")],
)
def test_bad_limit_settings_are_named_before_anything_loads(override, key):
    from tinyrl.compose import load_config
    from tinyrl.config import ConfigError

    with pytest.raises(ConfigError, match=f"^{key}: must be"):
        load_config([override])
    assert load_config(["task.reward_error_limit=null"]).task.reward_error_limit is None
