"""The Task API: Reward, the registry, and RewardScorer with real worker processes and real misbehaving rewards.

The misbehaving task lives at module level so that spawned workers can import this module and rebuild it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import tinyrl.task as task_mod
from tinyrl.reward_workers import RewardScorer, score_batch
from tinyrl.task import Reward, available_tasks, get_task, register_task


class ScriptedTask:
    """A task whose reward does what the completion says: misbehave, or score len(completion)."""

    name = "scripted"
    stop: tuple[str, ...] = ()
    chat_prefix = ""

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        return [{"i": i} for i in range(size)]

    def prompt(self, row: dict) -> str:
        return f"item {row['i']}"

    def messages(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": self.prompt(row)}]

    def reward(self, completion: str, row: dict) -> Reward:
        if completion == "raise":
            raise ValueError(f"cannot score row {row['i']}")
        if completion == "sleep":
            time.sleep(60)
        if completion == "spin":
            # Stays inside one C call for about an hour: a signal handler never gets to run.
            hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2**31 - 1)
        if completion == "exit":
            os._exit(7)
        if completion == "not a reward":
            return 1.0  # type: ignore[return-value]
        if completion == "unpicklable info":
            return Reward(1.0, True, True, {"callback": lambda: None})
        return Reward(float(len(completion)), True, True, {"pid": os.getpid(), "i": row["i"]})


def _rebuild_only_in(pid: int) -> ScriptedTask:
    if os.getpid() != pid:
        raise RuntimeError("this task cannot be rebuilt in another process")
    return ScriptedTask()


class ParentOnlyTask(ScriptedTask):
    """Pickles fine, but unpickling in a worker fails: the scorer must say so instead of hanging."""

    def __reduce__(self):
        return (_rebuild_only_in, (os.getpid(),))


class LambdaTask(ScriptedTask):
    def __init__(self):
        self.transform = lambda s: s  # lambdas cannot be pickled


def rows_for(completions: list[str]) -> list[dict]:
    return [{"i": i} for i in range(len(completions))]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(ScriptedTask(), workers=2, timeout=1.0) as s:
        yield s


# ---------------------------------------------------------------------------------------------------------------
# Reward and registry
# ---------------------------------------------------------------------------------------------------------------


def test_reward_is_frozen_with_its_own_info_dict():
    a, b = Reward(1.0, True, True), Reward(0.0, False, False)
    assert a.info == {} and a.info is not b.info
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.score = 0.5  # type: ignore[misc]


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(task_mod, "_REGISTRY", dict(task_mod._REGISTRY))


def test_register_as_decorator_and_call(clean_registry):
    @register_task("scripted_a")
    class A(ScriptedTask):
        def __init__(self, bonus: int = 0):
            self.bonus = bonus

    assert A.__name__ == "A"  # the decorator hands the class back
    register_task("scripted_b", ScriptedTask)
    built = get_task("scripted_a", bonus=3)
    assert isinstance(built, A) and built.bonus == 3
    assert isinstance(get_task("scripted_b"), ScriptedTask)
    assert {"scripted_a", "scripted_b", "countdown"} <= set(available_tasks())


def test_register_rejects_a_second_factory_for_a_name(clean_registry):
    register_task("scripted_c", ScriptedTask)
    register_task("scripted_c", ScriptedTask)  # the same factory again is fine (a module imported twice)
    with pytest.raises(ValueError, match="scripted_c.*already registered"):
        register_task("scripted_c", ParentOnlyTask)
    with pytest.raises(ValueError, match="name"):
        register_task("", ScriptedTask)


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown task 'nope'.*countdown"):
        get_task("nope")


def test_bad_kwarg_is_named():
    with pytest.raises(TypeError, match="max_numbrs"):
        get_task("countdown", max_numbrs=4)


def test_module_and_file_specs(tmp_path):
    task = get_task("tinyrl.tasks.countdown:Countdown", max_numbers=3)
    assert task.name == "countdown" and task.max_numbers == 3

    source = tmp_path / "my_task.py"
    source.write_text(
        textwrap.dedent(
            """
            from tinyrl.task import Reward

            class Echo:
                name = "echo"
                stop = ()
                chat_prefix = ""
                def __init__(self, word="hi"):
                    self.word = word
                def dataset(self, split, size, seed):
                    return [{"word": self.word}] * size
                def prompt(self, row):
                    return "Say " + row["word"]
                def messages(self, row):
                    return [{"role": "user", "content": self.prompt(row)}]
                def reward(self, completion, row):
                    ok = completion.strip() == row["word"]
                    return Reward(float(ok), ok, True)
            """
        )
    )
    echo = get_task(f"{source}:Echo", word="yo")
    assert echo.prompt(echo.dataset("train", 1, 0)[0]) == "Say yo"
    # A class loaded from a file is rebuilt in spawned workers too.
    rewards = score_batch(echo, ["yo", "no"], [{"word": "yo"}] * 2, workers=1)
    assert [r.correct for r in rewards] == [True, False]

    with pytest.raises(FileNotFoundError, match="missing.py"):
        get_task(f"{tmp_path / 'missing.py'}:Echo")
    with pytest.raises(ValueError, match="no attribute 'Nope'"):
        get_task(f"{source}:Nope")
    with pytest.raises(ValueError, match="cannot import module"):
        get_task("no_such_module_anywhere:Task")


def test_non_task_objects_are_refused():
    with pytest.raises(TypeError, match="lacks Task member"):
        get_task("collections:OrderedDict")


def test_builtin_task_loads_lazily_without_torch():
    code = textwrap.dedent(
        """
        import sys
        import tinyrl.task as t
        assert "tinyrl.tasks.countdown" not in sys.modules
        task = t.get_task("countdown")
        assert "tinyrl.tasks.countdown" in sys.modules
        assert "torch" not in sys.modules, "the task layer must not import torch"
        print(type(task).__name__, t.available_tasks())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Countdown") and "countdown" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# RewardScorer
# ---------------------------------------------------------------------------------------------------------------


def test_scores_in_order_across_both_workers(scorer):
    completions = ["x" * (i % 17) for i in range(300)]
    rewards = scorer.score(completions, rows_for(completions))
    assert [r.score for r in rewards] == [float(len(c)) for c in completions]
    assert [r.info["i"] for r in rewards] == list(range(300))
    assert len({r.info["pid"] for r in rewards}) == 2
    assert os.getpid() not in {r.info["pid"] for r in rewards}


def test_raising_reward_scores_zero_with_the_error(scorer):
    before = dict(scorer.stats)
    completions = ["ab", "raise", "abc", "not a reward", "unpicklable info", "de"]
    rewards = scorer.score(completions, rows_for(completions))
    assert [r.score for r in rewards] == [2.0, 0.0, 3.0, 0.0, 0.0, 2.0]
    assert rewards[1].info["error"] == "ValueError: cannot score row 1"
    assert "not Reward" in rewards[3].info["error"]
    assert "cannot be sent between processes" in rewards[4].info["error"]
    assert not rewards[1].correct and not rewards[1].formatted
    assert scorer.stats["errors"] - before["errors"] == 3
    assert scorer.stats["scored"] - before["scored"] == 6
    assert scorer.stats["worker_restarts"] == before["worker_restarts"]


def test_slow_python_reward_times_out_without_killing_the_worker(scorer):
    before = dict(scorer.stats)
    completions = ["a", "sleep", "abc"]
    start = time.monotonic()
    rewards = scorer.score(completions, rows_for(completions))
    assert time.monotonic() - start < 30  # far below the 60 s the reward would sleep
    assert rewards[1] == Reward(0.0, False, False, {"error": "timeout"})
    assert [rewards[0].score, rewards[2].score] == [1.0, 3.0]
    assert scorer.stats["timeouts"] - before["timeouts"] == 1
    assert scorer.stats["worker_restarts"] == before["worker_restarts"]  # the in-worker timer handled it


def test_reward_stuck_in_c_code_is_killed_and_replaced(scorer):
    before = dict(scorer.stats)
    completions = ["x" * i for i in range(20)] + ["spin"] + ["y" * i for i in range(20)]
    rewards = scorer.score(completions, rows_for(completions))
    assert rewards[20].info == {"error": "timeout"} and rewards[20].score == 0.0
    others = rewards[:20] + rewards[21:]
    assert [r.score for r in others] == [float(i) for i in range(20)] * 2
    assert scorer.stats["worker_restarts"] - before["worker_restarts"] == 1
    assert scorer.stats["timeouts"] - before["timeouts"] == 1


def test_worker_that_exits_is_replaced_and_only_its_sample_scores_zero(scorer):
    before = dict(scorer.stats)
    completions = ["ok"] * 10 + ["exit"] + ["fine"] * 10
    rewards = scorer.score(completions, rows_for(completions))
    assert rewards[10].score == 0.0 and "worker died (exit code 7)" in rewards[10].info["error"]
    assert [r.score for r in rewards[:10]] == [2.0] * 10 and [r.score for r in rewards[11:]] == [4.0] * 10
    assert scorer.stats["worker_restarts"] - before["worker_restarts"] == 1
    assert scorer.stats["errors"] - before["errors"] == 1


def test_worker_lost_between_batches_costs_no_sample(scorer):
    before = dict(scorer.stats)
    victim = scorer._pool[0].process
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    completions = ["x" * i for i in range(50)]
    rewards = scorer.score(completions, rows_for(completions))
    assert [r.score for r in rewards] == [float(i) for i in range(50)]
    assert scorer.stats["worker_restarts"] - before["worker_restarts"] == 1
    assert scorer.stats["errors"] == before["errors"]


def test_one_batch_with_every_failure_completes_in_order(scorer):
    completions = ["a", "raise", "bb", "exit", "ccc", "sleep", "dddd", "spin", "eeeee", "exit"]
    rewards = scorer.score(completions, rows_for(completions))
    assert [r.score for r in rewards] == [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0, 5.0, 0.0]
    errors = [r.info.get("error", "").split(":")[0].split(" (")[0] for r in rewards]
    assert errors == ["", "ValueError", "", "worker died", "", "timeout", "", "timeout", "", "worker died"]
    # The scorer is still usable after all that.
    again = scorer.score(["zz"], [{"i": 0}])
    assert again[0].score == 2.0


def test_in_process_scoring_catches_errors():
    rewards = score_batch(ScriptedTask(), ["ab", "raise"], [{"i": 0}, {"i": 1}], workers=0)
    assert rewards[0].score == 2.0 and rewards[0].info["pid"] == os.getpid()
    assert rewards[1].info["error"].startswith("ValueError")


def test_bad_arguments_are_named(scorer):
    with pytest.raises(ValueError, match="2 completions but 1 rows"):
        scorer.score(["a", "b"], [{"i": 0}])
    with pytest.raises(TypeError, match=r"completions\[1\] is int"):
        scorer.score(["a", 3], [{"i": 0}, {"i": 1}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="rows cannot be sent to a worker"):
        scorer.score(["a"], [{"i": 0, "callback": lambda: None}])
    assert scorer.score(["abc"], [{"i": 0}])[0].score == 3.0  # nothing is left stuck
    with pytest.raises(ValueError, match="workers"):
        RewardScorer(ScriptedTask(), workers=-1)
    with pytest.raises(ValueError, match="timeout"):
        RewardScorer(ScriptedTask(), timeout=0)
    with pytest.raises(TypeError, match="cannot be pickled"):
        RewardScorer(LambdaTask(), workers=1)


def test_task_that_cannot_load_in_a_worker_fails_clearly():
    with pytest.raises(RuntimeError, match="cannot be rebuilt in another process"):
        RewardScorer(ParentOnlyTask(), workers=1)


def test_close_stops_the_workers():
    scorer = RewardScorer(ScriptedTask(), workers=2, timeout=1.0)
    processes = [w.process for w in scorer._pool]
    assert all(p.is_alive() for p in processes)
    assert scorer.score([], []) == []
    scorer.close()
    scorer.close()
    assert not any(p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="after close"):
        scorer.score(["a"], [{"i": 0}])
