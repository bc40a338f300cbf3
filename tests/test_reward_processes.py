"""Reward code that does in a reward worker what it does at home: process pools, a `multiprocessing.Process` with a
timeout, threads, SIGALRM timeouts, veRL's own scorers; every process it starts is ended at the time limit or with
its worker (checked with psutil); what it prints that looks like an error reaches the run's records.

The task lives at module level so that spawned workers (and the processes they start) can import this module.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tinyrl.reward_workers import RewardScorer
from tinyrl.task import Reward

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups, /proc and RLIMIT_CPU are Linux's")


def _length(text: str) -> int:
    return len(text)


def _length_into(queue, text: str) -> None:
    queue.put(len(text))


def _sleep_forever() -> None:
    while True:
        time.sleep(1)


def _burn(seconds: float) -> float:
    """Spin on the CPU for `seconds` of this process's CPU time."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time()


_POOL: concurrent.futures.ProcessPoolExecutor | None = None  # kept across samples, like veRL's math_verify


class AtHome:
    """Each completion names what its reward does; the score is the completion's length however it is computed."""

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        return [{"i": i} for i in range(size)]

    def prompt(self, row: dict) -> str:
        return "say something"

    def reward(self, completion: str, row: dict) -> Reward:
        global _POOL
        kind = completion.split(":")[0]
        if kind == "pool":  # a process pool per call
            with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
                return Reward(float(pool.submit(_length, completion).result()), True, True)
        if kind == "spawned pool":  # a pool of spawned processes, as veRL's math_verify makes one
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                return Reward(float(pool.submit(_length, completion).result()), True, True)
        if kind == "process":  # veRL's timeout_limit: a process, joined with a timeout
            queue = multiprocessing.Queue()
            process = multiprocessing.Process(target=_length_into, args=(queue, completion))
            process.start()
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
                raise TimeoutError("the scoring process took too long")
            return Reward(float(queue.get(timeout=5)), True, True)
        if kind == "thread":
            found = []
            worker = threading.Thread(target=lambda: found.append(len(completion)))
            worker.start()
            worker.join()
            return Reward(float(found[0]), True, True)
        if kind == "alarm":  # math-verify's signal-based timeout: its own SIGALRM handler, then alarm(0)
            def give_up(signum, frame):
                raise TimeoutError("alarm")

            previous = signal.signal(signal.SIGALRM, give_up)
            signal.alarm(5)
            try:
                score = float(len(completion))
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
            if completion.endswith("then hang"):
                time.sleep(600)
            return Reward(score, True, True)
        if kind == "fork forever":  # a child that never ends, and a reward waiting for it
            pid = os.fork()
            if pid == 0:
                _sleep_forever()
            Path(row["pid_file"]).write_text(str(pid))
            os.waitpid(pid, 0)
        if kind == "orphan":  # a child that never ends, left behind by a reward that returns at once
            process = multiprocessing.Process(target=_sleep_forever)
            process.start()
            Path(row["pid_file"]).write_text(str(process.pid))
            return Reward(1.0, True, True)
        if kind == "busy pool":  # a pool process that outlives the sample and works for every one
            if _POOL is None:
                _POOL = concurrent.futures.ProcessPoolExecutor(max_workers=1)
            return Reward(_POOL.submit(_burn, 0.5).result(), True, True)
        if kind == "prints":  # code that catches its own error, says so, and scores 0 (as veRL's scorers do)
            print(f"Error in my scorer: could not parse {completion!r}", flush=True)
            print("parsed 3 expressions", flush=True)
            return Reward(0.0, False, False)
        if kind == "child prints":
            process = multiprocessing.Process(target=_complain)
            process.start()
            process.join()
            return Reward(0.0, False, False)
        return Reward(float(len(completion)), True, True)


def _complain() -> None:
    print("Traceback (most recent call last):\nValueError: the checker crashed in a child", file=sys.stderr)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _tree(scorer: RewardScorer) -> set[int]:
    """The worker processes and every process below them, now."""
    pids = set()
    for worker in scorer._pool:
        process = psutil.Process(worker.process.pid)
        pids |= {process.pid} | {p.pid for p in process.children(recursive=True)}
    return pids


def test_rewards_may_start_processes_and_threads_and_use_sigalrm_and_score_as_in_process():
    completions = ["pool: a", "spawned pool: bb", "process: ccc", "thread: dddd", "alarm: eeeee", "plain"]
    rows = [{"i": i} for i in range(len(completions))]
    expected = [float(len(c)) for c in completions]
    with RewardScorer(AtHome(), workers=0) as in_process:
        assert [r.score for r in in_process.score(completions, rows)] == expected
    with RewardScorer(AtHome(), workers=2, timeout=60.0, cpu_s=30.0, memory_mb=2048) as scorer:
        rewards = scorer.score(completions, rows)
        assert [r.info for r in rewards] == [{}] * len(completions)
        assert [r.score for r in rewards] == expected
        assert scorer.stats["worker_restarts"] == 0
        workers = [w.process.pid for w in scorer._pool]
    assert all(_gone(pid) for pid in workers)


def test_a_reward_whose_child_never_ends_is_stopped_at_the_time_limit_and_leaves_no_process(tmp_path):
    pid_file = tmp_path / "child.pid"
    with RewardScorer(AtHome(), workers=1, timeout=2.0, cpu_s=30.0) as scorer:
        first = scorer._pool[0].process.pid
        start = time.monotonic()
        (reward,) = scorer.score(["fork forever"], [{"i": 0, "pid_file": str(pid_file)}])
        took = time.monotonic() - start
        child = int(pid_file.read_text())
        assert reward.score == 0.0 and reward.info["error"] == "timeout"
        assert 2.0 <= took < 4.0  # the time limit (plus at most the parent's grace second), not later
        # the worker that started it was replaced, and neither it nor the child is left
        assert scorer.stats["worker_restarts"] == 1 and scorer._pool[0].process.pid != first
        deadline = time.monotonic() + 5
        while not (_gone(child) and _gone(first)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child) and _gone(first)
        # the fresh worker scores as before
        assert scorer.score(["abc"], [{"i": 1}])[0].score == 3.0


def test_processes_a_reward_leaves_behind_end_with_the_scorer(tmp_path):
    pid_file = tmp_path / "orphan.pid"
    with RewardScorer(AtHome(), workers=1, timeout=10.0) as scorer:
        (reward,) = scorer.score(["orphan"], [{"i": 0, "pid_file": str(pid_file)}])
        assert reward.score == 1.0
        orphan = int(pid_file.read_text())
        tree = _tree(scorer)
        assert orphan in tree and not _gone(orphan)  # it lives on between samples, as it would at home
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in tree if not _gone(pid)] == []


def test_a_signal_timeout_in_the_reward_does_not_cancel_the_workers_own():
    with RewardScorer(AtHome(), workers=1, timeout=1.5) as scorer:
        start = time.monotonic()
        rewards = scorer.score(["alarm: then hang", "ok"], [{"i": 0}, {"i": 1}])
        took = time.monotonic() - start
    assert rewards[0].info["error"] == "timeout" and rewards[1].score == 2.0
    assert took < 2.5  # the worker's timer fired (after the reward's alarm(0)): no parent kill, no restart
    assert scorer.stats["worker_restarts"] == 0


def test_processes_a_reward_keeps_get_the_cpu_allowance_of_each_sample():
    # One pool process burns 0.5 CPU seconds for each of 6 samples: 3 s in all, three times the per-sample limit.
    # Each process the worker started gets cpu_s more at every sample, as the worker does, so none is killed.
    with RewardScorer(AtHome(), workers=1, timeout=20.0, cpu_s=1.0) as scorer:
        rewards = scorer.score(["busy pool"] * 6, [{"i": i} for i in range(6)])
    assert [r.info.get("error") for r in rewards] == [None] * 6
    assert rewards[-1].score >= 3.0  # the pool process's own CPU clock


def test_printed_errors_come_back_with_the_reward_and_are_shown_once_and_kept(tmp_path, caplog, capfd):
    from tinyrl.reward_report import RewardErrorLog  # imports torch: not in the workers, which import this module

    log = RewardErrorLog(tmp_path / "reward_errors.jsonl")
    log.where = "step 3"
    with RewardScorer(AtHome(), workers=1, timeout=20.0, on_errors=log) as scorer:
        rewards = scorer.score(["prints: 1", "prints: 22", "child prints", "plain"], [{"i": i} for i in range(4)])
        assert scorer.stats["printed_errors"] == 3
    assert rewards[0].info["printed"] == ["Error in my scorer: could not parse 'prints: 1'"]
    assert rewards[2].info["printed"] == ["Traceback (most recent call last):",
                                          "ValueError: the checker crashed in a child"]
    assert "printed" not in rewards[3].info
    assert "parsed 3 expressions" in capfd.readouterr().err  # ordinary output still reaches the console
    shown = [r.getMessage() for r in caplog.records if "printed what looks like an error" in r.getMessage()]
    assert len(shown) == 3  # the two "could not parse" lines differ only in data: one message, shown once
    assert any("could not parse" in m and "row: {'i': 0}" in m for m in shown)
    kept = [json.loads(line) for line in (tmp_path / "reward_errors.jsonl").read_text().splitlines()]
    assert [k["printed"] for k in kept] == [
        "Error in my scorer: could not parse 'prints: 1'", "Error in my scorer: could not parse 'prints: 22'",
        "Traceback (most recent call last):", "ValueError: the checker crashed in a child",
    ]
    assert {k["where"] for k in kept} == {"step 3"} and kept[0]["completion"] == "prints: 1"


# ---------------------------------------------------------------------------------------------------------------
# veRL's own scorers (veRL 0.9.1, installed without its dependencies; see verl_without_ray/)
# ---------------------------------------------------------------------------------------------------------------

VERL = str(Path(__file__).with_name("verl_scorers.py"))
needs_verl = pytest.mark.skipif(
    importlib.util.find_spec("verl") is None or importlib.util.find_spec("math_verify") is None
    or importlib.util.find_spec("pylatexenc") is None,
    reason="veRL's scorers need `pip install --no-deps verl==0.9.1` and the test extra (.ci/run installs them)",
)


@needs_verl
def test_verl_scorers_that_start_processes_give_in_workers_what_they_give_in_process(tmp_path):
    from tinyrl.data import write_rows
    from tinyrl.task import get_task

    cases = [  # (data_source, ground truth, completion): the two reported cases, an equivalent form, a wrong answer
        ("numina_cn_k12", "\\frac{1}{2}", "The answer is \\boxed{0.5}"),
        ("numina_cn_k12", "x^2+2x+1", "\\boxed{(x+1)^2}"),
        ("numina_synthetic_math", "\\sqrt{2}", "so \\boxed{\\sqrt 2}"),
        ("numina_olympiads", "3", "\\boxed{4}"),
    ]
    rows = [{"data_source": source, "prompt": "q", "reward_model": {"ground_truth": truth},
             "extra_info": {"scorer": scorer}} for scorer in ("math_verify", "prime_math", "default")
            for source, truth, _ in cases]
    completions = [c for _, _, c in cases] * 3
    task = get_task("file", train_file=str(write_rows(tmp_path / "rows.jsonl", rows)),
                    compute_score=f"{VERL}:by_name")
    with RewardScorer(task, workers=0) as in_process:
        expected = [r.score for r in in_process.score(completions, rows)]
    assert expected == [1.0, 1.0, 1.0, 0.0] * 3  # veRL's own answers
    with RewardScorer(task, workers=1, timeout=60.0, cpu_s=60.0, memory_mb=4096) as scorer:
        rewards = scorer.score(completions, rows)
    assert [r.score for r in rewards] == expected
    assert [r.info for r in rewards] == [{}] * len(rows)  # no error swallowed and printed
