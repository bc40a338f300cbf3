"""Scoring completions with ``task.reward`` in worker processes, under wall-clock, CPU-time and memory limits.

Standard library only: the workers import this module. A reward is user code run on model output, so a sample
may raise, return nonsense, run forever in Python or in C, allocate without bound, or kill its process; each of
these scores 0 with the error recorded in ``Reward.info`` (message, traceback, where it was raised) and the batch
completes in input order. A worker that had to be killed, died, or ran out of memory is replaced.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from typing import Any, Callable, Sequence

from tinyrl.task import Reward, Task, complete_task, exec_file_module, file_modules

__all__ = ["RewardScorer", "score_batch", "reward_accepts_token_ids"]


# ----------------------------------------------------------------------------------------------------------------
# Scoring one sample (shared by the in-process path and the workers)
# ----------------------------------------------------------------------------------------------------------------


class _SampleTimeout(BaseException):
    """Raised inside a worker by SIGALRM; a BaseException so a reward's ``except Exception`` cannot swallow it."""


_ALARM_ARMED = [False]


def _on_alarm(signum, frame):
    if _ALARM_ARMED[0]:
        raise _SampleTimeout()


def error_reward(error: str, trace: str = "", where: str = "") -> Reward:
    """A zero reward recording a failure: ``info = {"error", "traceback", "where"}`` (empty parts left out)."""
    info = {"error": error}
    if trace:
        info["traceback"] = trace
    if where:
        info["where"] = where
    return Reward(0.0, False, False, info)


def _raised_at(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback: with the type, what makes an error distinct."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


def reward_accepts_token_ids(task: Any) -> bool:
    """Whether ``task.reward`` takes a ``completion_ids`` keyword (or ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(task.reward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "completion_ids" or p.kind is p.VAR_KEYWORD for p in params)


def _checked(reward: Any) -> Reward:
    if not isinstance(reward, Reward):
        return error_reward(f"reward returned {type(reward).__name__}, not Reward")
    score = reward.score
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return error_reward(f"reward score is {type(score).__name__} {score!r}, not a number")
    if not math.isfinite(score):
        return error_reward(f"reward score is {score!r}, not finite")
    if not isinstance(reward.info, dict):
        return error_reward(f"reward info is {type(reward.info).__name__}, not dict")
    components = reward.components
    if not isinstance(components, dict):
        return error_reward(f"reward components are {type(components).__name__}, not dict")
    for name, value in components.items():
        if not isinstance(name, str) or not isinstance(value, (int, float)):
            return error_reward(f"reward component {name!r} = {value!r}: components map names to numbers")
        if not math.isfinite(value):
            return error_reward(f"reward component {name!r} is {value!r}, not finite")
    return reward


def _score_one(task: Any, completion: str, row: dict, ids: list[int] | None, alarm_after: float | None) -> Reward:
    """``task.reward`` with every failure turned into a zero reward that records the error."""
    try:
        try:
            _ALARM_ARMED[0] = alarm_after is not None
            if alarm_after is not None:
                signal.setitimer(signal.ITIMER_REAL, alarm_after)
            if ids is None:
                reward = task.reward(completion, row)
            else:
                reward = task.reward(completion, row, completion_ids=ids)
        finally:
            _ALARM_ARMED[0] = False
            if alarm_after is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _SampleTimeout:
        return error_reward("timeout")
    except MemoryError as exc:
        return error_reward(f"MemoryError: {exc or 'out of memory'} (the reward worker memory limit)",
                            traceback.format_exc(limit=-8), _raised_at(exc))
    except (Exception, SystemExit) as exc:
        return error_reward(f"{type(exc).__name__}: {exc}", traceback.format_exc(), _raised_at(exc))
    return _checked(reward)


# ----------------------------------------------------------------------------------------------------------------
# Limits inside a worker
# ----------------------------------------------------------------------------------------------------------------


def _address_space_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _limit_memory(memory_mb: int) -> None:
    """Let the address space grow by at most ``memory_mb`` beyond what the loaded worker holds (RLIMIT_AS).

    Relative, because what a worker maps just by importing its task's modules varies by gigabytes (a CUDA build of
    torch maps a lot); the limit is meant for what a reward allocates. Beyond it allocations raise MemoryError.
    """
    import resource

    used = _address_space_bytes()
    if used is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = used + (memory_mb << 20)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _limit_cpu(cpu_s: float) -> None:
    """Allow the next sample ``cpu_s`` more CPU seconds (RLIMIT_CPU is per process and cumulative, so it moves).

    Past the soft limit the kernel sends SIGXCPU, whose default action ends the process even while it is stuck in
    C code, where the Python-level timer cannot reach it.
    """
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(_cpu_seconds() + cpu_s)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


# ----------------------------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------------------------
#
# Protocol: the parent sends a chunk as a list of (completion, row, token ids or None) triples, or None to stop.
# Before each sample the worker writes (index in chunk, start time) into a shared array, so when the parent kills
# a stuck worker or sees one die it knows which sample to blame; the worker answers once per chunk with
# ("done", [reward tuples], retire). retire=True means the worker ran out of memory and exits; the parent
# replaces it. Worker-to-parent messages: ("ready",), ("init_error", text), ("done", results, retire).


def _as_tuple(r: Reward) -> tuple:
    return (r.score, r.correct, r.formatted, r.info, r.components)


def _worker_main(conn, task_bytes: bytes, modules: list[tuple[str, str]], progress, limits: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    try:
        for module_name, path in modules:
            if module_name not in sys.modules:
                exec_file_module(module_name, path)
        task = pickle.loads(task_bytes)
        if hasattr(task, "prepare_worker"):  # load what scoring needs (reward functions, verifier libraries) now
            task.prepare_worker()
        if limits["memory_mb"] and hasattr(os, "sysconf"):
            _limit_memory(limits["memory_mb"])
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    alarm_after = None
    if hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, _on_alarm)
        alarm_after = limits["timeout"]
    cpu_s = limits["cpu_s"] if sys.platform != "win32" else 0
    conn.send(("ready",))
    while True:
        try:
            chunk = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if chunk is None:
            return
        out, retire = [], False
        for i, (completion, row, ids) in enumerate(chunk):
            progress[0] = i
            progress[1] = time.monotonic()
            if cpu_s:
                _limit_cpu(cpu_s)
            r = _score_one(task, completion, row, ids, alarm_after)
            retire = retire or r.info.get("error", "").startswith("MemoryError")
            out.append(_as_tuple(r))
        progress[1] = 0.0
        try:
            conn.send(("done", out, retire))
        except Exception:  # a reward put something into info that cannot cross processes; nothing was sent
            conn.send(("done", [_picklable(result) for result in out], retire))
        if retire:
            return


_START_TIMEOUT = 300.0  # seconds a new worker may take to import the task's modules


def _file_modules_in(task_bytes: bytes) -> list[tuple[str, str]]:
    """The file-loaded modules a pickled task refers to (a pickle names the module of every class it holds)."""
    return sorted((name, path) for name, path in file_modules().items() if name.encode() in task_bytes)


def _picklable(result: tuple) -> tuple:
    try:
        pickle.dumps(result)
        return result
    except Exception as exc:
        return _as_tuple(error_reward(f"reward info cannot be sent between processes: {exc}"))


def _death_message(exitcode: int | None, limits: dict) -> str:
    text = f"worker died (exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGXCPU":
            text += f", SIGXCPU: over the CPU time limit of {limits['cpu_s']:g} s"
        elif name == "SIGKILL":
            text += ", SIGKILL: killed from outside, e.g. by the system running out of memory"
        else:
            text += f", {name}"
    return text + ")"


class _Worker:
    def __init__(self, ctx, task_bytes: bytes, limits: dict):
        self.progress = ctx.RawArray("d", 2)
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.conn = parent_conn
        self.process = ctx.Process(
            target=_worker_main,
            args=(child_conn, task_bytes, _file_modules_in(task_bytes), self.progress, limits),
            daemon=True,
            name="tinyrl-reward-worker",
        )
        self.process.start()
        child_conn.close()
        self.ready = False
        self.chunk: list[int] | None = None  # sample indices being scored, None when idle

    def running_since(self) -> float | None:
        started = self.progress[1]
        return started if self.chunk is not None and started > 0.0 else None

    def ask_to_stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass

    def stop(self, wait: float = 1.0) -> None:
        self.ask_to_stop()
        self.process.join(wait)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _stop_workers(workers: list[_Worker]) -> None:
    for w in workers:
        w.ask_to_stop()  # all at once, so they wind down in parallel
    deadline = time.monotonic() + 1.0
    for w in workers:
        w.stop(wait=max(0.0, deadline - time.monotonic()))
    workers.clear()


def _check_number(value: Any, name: str, allow_zero: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value < math.inf
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"RewardScorer: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


class RewardScorer:
    """Scores completions with ``task.reward`` in persistent worker processes, with per-sample limits.

    A reward that raises or returns a non-finite score scores 0 with the error in ``info["error"]`` (and the
    traceback in ``info["traceback"]``); one that runs longer than ``timeout`` seconds scores 0 with
    ``info["error"] == "timeout"``; one that kills its worker (os._exit, a segfault, more than ``cpu_s`` CPU
    seconds) scores 0 and the worker is replaced; one that allocates more than ``memory_mb`` beyond what the
    worker held at start gets a MemoryError, scores 0, and its worker is replaced after the chunk. The batch
    always completes and keeps input order.

    Workers are started with the "spawn" method (the trainer process holds torch threads, which fork would
    copy in a broken state); they receive the pickled task once. Inside a worker a timer signal interrupts a
    slow reward at ``timeout``; a computation stuck in C code ignores it, so RLIMIT_CPU ends the worker after
    ``cpu_s`` CPU seconds, and the parent kills it after ``timeout`` plus a grace period, whichever comes first.
    ``memory_mb=0`` and ``cpu_s=0`` turn those limits off (they need Linux; elsewhere only the wall clock holds).

    ``workers=0`` scores in this process: exceptions are still caught, but there is no limit of any kind.
    ``on_errors``, if given, is called after each ``score`` with ``(completions, rows, rewards)`` whenever some
    reward failed, so a caller can show and keep the errors.
    """

    def __init__(
        self,
        task: Task,
        workers: int = 2,
        timeout: float = 2.0,
        *,
        cpu_s: float = 0.0,
        memory_mb: int = 0,
        on_errors: Callable[[Sequence[str], Sequence[dict], Sequence[Reward]], None] | None = None,
    ):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"RewardScorer: workers must be an integer >= 0, got {workers!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
            raise ValueError(f"RewardScorer: timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 0:
            raise ValueError(f"RewardScorer: memory_mb must be an integer >= 0, got {memory_mb!r}")
        if not callable(getattr(task, "reward", None)):
            raise TypeError(f"RewardScorer: {type(task).__name__} has no callable reward(completion, row)")
        self.task = complete_task(task)
        self.workers = workers
        self.timeout = float(timeout)
        self.limits = {"timeout": self.timeout, "cpu_s": _check_number(cpu_s, "cpu_s", True), "memory_mb": memory_mb}
        self.kill_after = self.timeout + min(1.0, self.timeout)  # the in-worker signal gets a chance first
        self.on_errors = on_errors
        self.takes_token_ids = reward_accepts_token_ids(self.task)
        self.stats = {"scored": 0, "errors": 0, "timeouts": 0, "worker_restarts": 0}
        self._pool: list[_Worker] = []
        self._failed_starts = 0  # replacement workers that died before they were ready, in a row
        self._closed = False
        if workers == 0:
            return
        try:
            self._task_bytes = pickle.dumps(self.task)
        except Exception as exc:
            raise TypeError(
                f"RewardScorer: task {type(task).__qualname__} cannot be pickled for worker processes ({exc}); "
                "define it at module level or use workers=0"
            ) from exc
        self._ctx = multiprocessing.get_context("spawn")
        self._finalizer = weakref.finalize(self, _stop_workers, self._pool)
        self._pool.extend(_Worker(self._ctx, self._task_bytes, self.limits) for _ in range(workers))
        try:
            for w in self._pool:
                self._await_ready(w)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers. Safe to call twice."""
        self._closed = True
        if self._pool:
            self._finalizer()

    def score(
        self, completions: list[str], rows: list[dict], completion_ids: Sequence[Sequence[int]] | None = None
    ) -> list[Reward]:
        """One Reward per completion, in input order; ``rows[i]`` is the problem ``completions[i]`` answers.

        ``completion_ids[i]`` (optional) are the token ids of ``completions[i]``; they reach rewards that take a
        ``completion_ids`` keyword.
        """
        if self._closed:
            raise RuntimeError("RewardScorer.score called after close()")
        completions, rows = list(completions), list(rows)
        if len(completions) != len(rows):
            raise ValueError(f"RewardScorer.score: {len(completions)} completions but {len(rows)} rows")
        for i, c in enumerate(completions):
            if not isinstance(c, str):
                raise TypeError(f"RewardScorer.score: completions[{i}] is {type(c).__name__}, not str")
        if completion_ids is not None and len(completion_ids) != len(completions):
            raise ValueError(
                f"RewardScorer.score: {len(completion_ids)} completion_ids for {len(completions)} completions"
            )
        ids: list = [None] * len(completions)
        if self.takes_token_ids and completion_ids is not None:
            ids = [list(map(int, t)) for t in completion_ids]
        if self.workers == 0:
            results = [_score_one(self.task, c, r, i, None) for c, r, i in zip(completions, rows, ids)]
        else:
            results = self._score_in_workers(completions, rows, ids)
        self.stats["scored"] += len(results)
        failed = False
        for r in results:
            error = r.info.get("error") if isinstance(r.info, dict) else None
            if error == "timeout":
                self.stats["timeouts"] += 1
            elif error is not None:
                self.stats["errors"] += 1
            failed = failed or error is not None
        if failed and self.on_errors is not None:
            self.on_errors(completions, rows, results)
        return results

    # -- worker management ------------------------------------------------------------------------------------

    def _await_ready(self, w: _Worker) -> None:
        msg = None
        try:
            if not w.conn.poll(_START_TIMEOUT):
                raise RuntimeError(f"reward worker did not start within {_START_TIMEOUT:.0f} s")
            msg = w.conn.recv()
        except (EOFError, OSError):
            pass
        if msg == ("ready",):
            w.ready = True
            return
        if msg is not None and msg[0] == "init_error":
            raise RuntimeError(f"reward worker could not load task {type(self.task).__qualname__}:\n{msg[1]}")
        w.process.join(1.0)
        raise RuntimeError(f"reward worker exited during start-up (exit code {w.process.exitcode})")

    def _replace(self, w: _Worker) -> _Worker:
        w.stop(wait=0)
        fresh = _Worker(self._ctx, self._task_bytes, self.limits)
        self._pool[self._pool.index(w)] = fresh
        self.stats["worker_restarts"] += 1
        return fresh

    def _score_in_workers(self, completions: list[str], rows: list[dict], ids: list) -> list[Reward]:
        n = len(completions)
        results: list[Reward | None] = [None] * n
        # Several chunks per worker balance the load; a chunk bounds the rework after a kill.
        size = max(1, min(64, math.ceil(n / (4 * self.workers))))
        pending = deque(list(range(i, min(i + size, n))) for i in range(0, n, size))

        unattributed = 0

        def blame(w: _Worker, error: str) -> None:
            # The sample the worker was on gets the error; the rest of its chunk is scored again elsewhere.
            nonlocal unattributed
            chunk, w.chunk = w.chunk or [], None
            if not chunk:
                return
            if w.progress[1] == 0.0:  # lost before it started a sample: no sample is to blame
                unattributed += 1
                if unattributed > 2 * self.workers + 2:
                    raise RuntimeError("reward workers keep dying before they score anything")
                pending.appendleft(chunk)
                return
            at = min(int(w.progress[0]), len(chunk) - 1)
            results[chunk[at]] = error_reward(error)
            rest = chunk[:at] + chunk[at + 1 :]
            if rest:
                pending.appendleft(rest)

        while pending or any(w.chunk is not None for w in self._pool):
            for w in self._pool:
                if w.ready and w.chunk is None and pending:
                    chunk = pending.popleft()
                    try:
                        payload = pickle.dumps([(completions[i], rows[i], ids[i]) for i in chunk])
                    except Exception as exc:
                        raise TypeError(f"RewardScorer.score: rows cannot be sent to a worker ({exc})") from exc
                    w.chunk = chunk
                    w.progress[1] = 0.0
                    try:
                        w.conn.send_bytes(payload)
                    except OSError:
                        pass  # the worker died; the next pass over the pool replaces it and requeues the chunk
            now = time.monotonic()
            deadlines = [s + self.kill_after for w in self._pool if (s := w.running_since()) is not None]
            wait_for = max(0.0, min(deadlines) - now) if deadlines else self.kill_after
            waitables = [w.conn for w in self._pool] + [w.process.sentinel for w in self._pool]
            multiprocessing.connection.wait(waitables, timeout=wait_for)
            for w in list(self._pool):
                self._service(w, results, blame)
        return results  # type: ignore[return-value]

    def _service(self, w: _Worker, results: list, blame: Callable[[_Worker, str], None]) -> None:
        try:
            has_message = w.conn.poll()
        except (EOFError, OSError):
            has_message = False
        if has_message:
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is not None:
                kind = msg[0]
                if kind == "ready":
                    w.ready = True
                    self._failed_starts = 0
                elif kind == "done" and w.chunk is not None:
                    for i, values in zip(w.chunk, msg[1]):
                        results[i] = Reward(*values)
                    w.chunk = None
                    if msg[2]:  # out of memory: a fresh process rather than a fragmented heap
                        w.process.join(5.0)
                        self._replace(w)
                elif kind == "init_error":
                    raise RuntimeError(f"reward worker could not load task after a restart:\n{msg[1]}")
                return
        if not w.process.is_alive():
            w.process.join()
            if not w.ready:
                self._failed_starts += 1
                if self._failed_starts > 3:
                    raise RuntimeError(f"reward workers keep exiting during start-up (exit code {w.process.exitcode})")
            blame(w, _death_message(w.process.exitcode, self.limits))
            self._replace(w)
            return
        started = w.running_since()
        if started is not None and time.monotonic() - started > self.kill_after:
            w.process.kill()
            w.process.join()
            blame(w, "timeout")
            self._replace(w)


def score_batch(
    task: Task, completions: list[str], rows: list[dict], workers: int = 2, timeout: float = 2.0, **limits: Any
) -> list[Reward]:
    """Score one batch with a throw-away RewardScorer (prefer one long-lived RewardScorer for many batches)."""
    with RewardScorer(task, workers=workers, timeout=timeout, **limits) as scorer:
        return scorer.score(completions, rows)


def scorer_from_config(task: Task, task_config: Any, on_errors: Callable | None = None) -> RewardScorer:
    """The `RewardScorer` a config's `task` node asks for: `reward_workers` processes under the `reward_timeout_s`,
    `reward_cpu_s` and `reward_memory_mb` limits. A key the node lacks (a tinyrl-eval task file need not state
    them) takes the training schema's default (`tinyrl.config.TaskConfig`)."""
    from tinyrl.config import TaskConfig

    def setting(key: str) -> Any:
        return getattr(task_config, key, getattr(TaskConfig, key))

    return RewardScorer(
        task, workers=int(setting("reward_workers")), timeout=float(setting("reward_timeout_s")),
        cpu_s=float(setting("reward_cpu_s")), memory_mb=int(setting("reward_memory_mb")), on_errors=on_errors,
    )
