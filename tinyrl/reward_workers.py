"""Scoring completions with ``task.reward`` in worker processes, under wall-clock, CPU-time and memory limits.

Standard library only: the workers import this module. A reward is user code run on model output, so a sample
may raise, return nonsense, run forever in Python or in C, allocate without bound, or kill its process; each of
these scores 0 with the error recorded in ``Reward.info`` (message, traceback, where it was raised) and the batch
completes in input order. A worker that had to be killed, died, or ran out of memory is replaced.

Reward code may do in a worker what it does in its home framework: start processes (a process pool, a
``multiprocessing.Process`` with a timeout, ``subprocess``), use threads, and use signal-based timeouts
(``signal.alarm``; it runs in the worker's main thread, and the worker's own timer does not use SIGALRM). Each
worker is the leader of its own process group; when a sample times out in a worker that has started processes, or
a worker is replaced or stopped, the worker and every process it started are ended. What reward code writes to
stdout or stderr (its processes' too) is read after each sample: lines that look like an error come back in
``Reward.info["printed"]`` for the run to show and keep, the rest goes to the console as before.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from typing import Any, Callable, Sequence

from tinyrl import process_tree
from tinyrl.task import Reward, Task, complete_task, exec_file_module, file_modules

__all__ = ["RewardScorer", "score_batch", "reward_accepts_token_ids"]


# ----------------------------------------------------------------------------------------------------------------
# Scoring one sample (shared by the in-process path and the workers)
# ----------------------------------------------------------------------------------------------------------------


class _SampleTimeout(BaseException):
    """Raised in a worker's main thread when a sample runs past its time; a BaseException so that a reward's
    ``except Exception`` cannot swallow it."""


# The worker's timer interrupts its main thread with this signal, not SIGALRM: reward code keeps SIGALRM for its
# own timeouts (math-verify's, veRL's), and cancelling its alarm must not cancel ours.
_TIMEOUT_SIGNAL = signal.SIGRTMIN + 1 if hasattr(signal, "SIGRTMIN") else getattr(signal, "SIGUSR2", None)
_ALARM_ARMED = [False]


def _on_timeout_signal(signum, frame):
    if _ALARM_ARMED[0]:
        _ALARM_ARMED[0] = False
        raise _SampleTimeout()


class _Watchdog:
    """A thread of a worker: at a sample's deadline it interrupts the main thread (where the reward runs) with
    `_SampleTimeout`; when the parent process is gone it ends the worker and everything it started."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.deadline: float | None = None
        self.parent = os.getppid()
        self.main = threading.main_thread().ident
        self.wake = threading.Condition()
        signal.signal(_TIMEOUT_SIGNAL, _on_timeout_signal)
        threading.Thread(target=self._watch, name="tinyrl-reward-watchdog", daemon=True).start()

    def arm(self) -> None:
        with self.wake:
            _ALARM_ARMED[0] = True
            self.deadline = time.monotonic() + self.timeout
            if self.timeout < 1.0:  # otherwise the thread, awake at least once a second, sees it in time
                self.wake.notify()

    def disarm(self) -> None:
        _ALARM_ARMED[0] = False
        with self.wake:
            self.deadline = None

    def _watch(self) -> None:
        with self.wake:
            while True:
                if os.getppid() != self.parent:
                    _end_worker(1)
                left = 1.0 if self.deadline is None else self.deadline - time.monotonic()
                if left > 0:
                    self.wake.wait(min(left, 1.0))
                    continue
                self.deadline = None
                signal.pthread_kill(self.main, _TIMEOUT_SIGNAL)


# A line of output that looks like an error: an exception name, a traceback, "error", "failed", "fatal".
_ERROR_LINE = re.compile(r"(?i)(\w*(error|exception)\b|\btraceback\b|\bfailed\b|\bfatal\b)")
_PRINTED_CHARS = 500  # of one printed line kept with a reward


class _CapturedOutput:
    """The worker's stdout and stderr (file descriptors 1 and 2, which the processes it starts inherit) go to an
    unlinked temporary file; `take` reads what was written since the last call, writes the ordinary lines on to the
    console and returns the lines that look like errors."""

    def __init__(self):
        self.console = os.dup(2)
        fd, path = tempfile.mkstemp(prefix="tinyrl-reward-output-")
        os.close(fd)
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND)
        os.unlink(path)
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)
        self.offset, self.partial = 0, b""

    def take(self) -> list[str]:
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        chunks = []
        while True:
            chunk = os.pread(self.fd, 1 << 16, self.offset)
            if not chunk:
                break
            chunks.append(chunk)
            self.offset += len(chunk)
        if self.offset > (1 << 20):  # start the file again; a process writing right now may lose a line
            os.ftruncate(self.fd, 0)
            self.offset = 0
        data = self.partial + b"".join(chunks)
        complete, _, self.partial = data.rpartition(b"\n")
        if not complete:
            return []
        errors, plain = [], []
        for line in complete.decode("utf-8", errors="replace").split("\n"):
            (errors if _ERROR_LINE.search(line) else plain).append(line)
        if plain:
            try:
                os.write(self.console, ("\n".join(plain) + "\n").encode("utf-8", errors="replace"))
            except OSError:
                pass
        return [line.strip()[:_PRINTED_CHARS] for line in errors if line.strip()]


def _flush(stream: Any) -> None:
    try:
        stream.flush()
    except Exception:
        pass


def _end_worker(code: int) -> None:
    """End every process this worker started (those in its process group too, orphans included), then itself,
    without running exit handlers that could wait on them."""
    me = os.getpid()
    leads_group = os.getpgid(0) == me  # never the trainer's group, should the worker not have its own
    for _ in range(3):  # a process may start another between the look and the kill
        doomed = set(process_tree.descendants(me)) | set(process_tree.group_members(me) if leads_group else ())
        doomed.discard(me)
        if not doomed:
            break
        process_tree.kill_all(doomed)
    process_tree.reap_children()
    try:  # release what multiprocessing objects of reward code hold (semaphores), as a normal exit would
        multiprocessing.util._run_finalizers(0)
    except Exception:
        pass
    os._exit(code)


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
    not_applicable = isinstance(reward.info, dict) and "not_applicable" in reward.info and math.isnan(score)
    if not math.isfinite(score) and not not_applicable:
        return error_reward(f"reward score is {score!r}, not finite (Reward.not_applicable says it does not apply)")
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


def _score_one(task: Any, completion: str, row: dict, ids: list[int] | None, watchdog: _Watchdog | None) -> Reward:
    """``task.reward`` with every failure turned into a zero reward that records the error."""
    try:
        try:
            if watchdog is not None:
                watchdog.arm()
            if ids is None:
                reward = task.reward(completion, row)
            else:
                reward = task.reward(completion, row, completion_ids=ids)
        finally:
            if watchdog is not None:
                watchdog.disarm()
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
# ("done", [reward tuples], retire). retire=True means the worker stopped after the last result it sent (it ran
# out of memory, or a sample timed out while processes it started lived on) and exits; the parent scores the rest
# of the chunk elsewhere and replaces it. Worker-to-parent messages: ("ready", [printed error lines]),
# ("init_error", text), ("done", results, retire).


def _as_tuple(r: Reward) -> tuple:
    return (r.score, r.correct, r.formatted, r.info, r.components)


def _worker_main(conn, task_bytes: bytes, modules: list[tuple[str, str]], progress, limits: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    signal.signal(signal.SIGTERM, lambda signum, frame: _end_worker(128 + signum))
    if hasattr(os, "setsid"):
        os.setsid()  # a process group of its own: ending the group ends whatever the worker started
    # The parent starts workers daemonic (it ends them when it exits); reward code may start processes, which
    # multiprocessing refuses a daemonic process, so the worker drops the flag and ends its processes itself.
    multiprocessing.current_process().daemon = False
    # A spawned process inherits "spawn" as its default start method; reward code gets the platform's default, as
    # in any other Python process (veRL's timeout_limit starts a fork of a function that cannot be pickled).
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    output = _CapturedOutput() if os.name == "posix" else None
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
        printed = "\n".join(output.take()) if output is not None else ""
        conn.send(("init_error", traceback.format_exc() + (f"\nit printed:\n{printed}" if printed else "")))
        _end_worker(0)
    watchdog = None
    if _TIMEOUT_SIGNAL is not None and hasattr(signal, "pthread_kill"):
        watchdog = _Watchdog(limits["timeout"])
    cpu_s = limits["cpu_s"] if sys.platform != "win32" else 0
    # Processes a reward started (a pool that outlives the sample) inherit the worker's RLIMIT_CPU, which counts their
    # own CPU time from 0 and never moves: they get cpu_s more CPU seconds at each look, which comes at every chunk
    # and at least every cpu_s / 2 seconds (a look costs ~0.1 ms, so not at every sample).
    look_every = min(1.0, cpu_s / 2)
    conn.send(("ready", output.take() if output is not None else []))
    while True:
        try:
            chunk = pickle.loads(conn.recv_bytes())
        except EOFError:
            chunk = None
        if chunk is None:
            _end_worker(0)
        out, retire, looked = [], False, -math.inf
        for i, (completion, row, ids) in enumerate(chunk):
            progress[0] = i
            progress[1] = now = time.monotonic()
            if cpu_s:
                _limit_cpu(cpu_s)
                if now - looked >= look_every:
                    looked = now
                    for pid in process_tree.descendants(os.getpid()):
                        process_tree.allow_cpu(pid, cpu_s)
            r = _score_one(task, completion, row, ids, watchdog)
            printed = output.take() if output is not None else []
            if printed:
                r = dataclasses.replace(r, info={**r.info, "printed": printed})
            out.append(_as_tuple(r))
            error = r.info.get("error", "")
            # Out of memory: a fresh process rather than a fragmented heap. Timed out with processes started: they
            # may still work for the lost sample, and ending them could break state the reward code keeps (a
            # process pool), so a fresh worker takes over and the rest of the chunk is scored there.
            if error.startswith("MemoryError") or (error == "timeout" and process_tree.descendants(os.getpid())):
                retire = True
                break
        progress[1] = 0.0
        try:
            conn.send(("done", out, retire))
        except Exception:  # a reward put something into info that cannot cross processes; nothing was sent
            conn.send(("done", [_picklable(result) for result in out], retire))
        if retire:
            _end_worker(0)


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
        self.ready = False  # it said so: its modules are loaded and it leads its own process group
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
        """Ask the worker to stop (it ends what it started), wait up to ``wait`` seconds, then `end` it."""
        self.ask_to_stop()
        self.process.join(wait)
        self.end()
        self.conn.close()

    def end(self) -> None:
        """Kill the worker and every process it started, wherever they are now (those it left behind keep its
        process group)."""
        pid = self.process.pid
        alive = self.process.is_alive()
        doomed = process_tree.descendants(pid) if alive else []
        try:  # a worker says it is ready only once it leads its own process group
            leads_group = os.getpgid(pid) == pid if alive else self.ready
        except OSError:
            leads_group = self.ready
        if leads_group:  # never the trainer's own group: a worker killed before it called setsid is not in one
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        if alive:
            self.process.kill()
        process_tree.kill_all(doomed)
        self.process.join()


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
    worker held at start gets a MemoryError, scores 0, and its worker is replaced. The batch always completes
    and keeps input order. Lines the reward code printed that look like errors are in ``info["printed"]``.

    Workers are started with the "spawn" method (the trainer process holds torch threads, which fork would
    copy in a broken state); they receive the pickled task once. Reward code may start processes and threads
    and use SIGALRM (see the module docstring). Inside a worker a timer thread interrupts a slow reward at
    ``timeout``; a computation stuck in C code ignores it, so RLIMIT_CPU ends the worker after ``cpu_s`` CPU
    seconds, and the parent kills it after ``timeout`` plus a grace period, whichever comes first. Processes the
    reward started get ``cpu_s`` CPU seconds per sample too, inherit the memory limit, and are ended with their
    worker when a sample times out or the worker is replaced or stopped. ``memory_mb=0`` and ``cpu_s=0`` turn
    those limits off (they need Linux; elsewhere only the wall clock holds).

    ``workers=0`` scores in this process: exceptions are still caught, but there is no limit of any kind and
    printed output is not read. ``on_errors``, if given, is called after each ``score`` with
    ``(completions, rows, rewards)`` whenever some reward failed or printed an error, so a caller can show and
    keep them.
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
        self.stats = {"scored": 0, "errors": 0, "timeouts": 0, "worker_restarts": 0, "printed_errors": 0}
        self._pool: list[_Worker] = []
        self._failed_starts = 0  # replacement workers that died before they were ready, in a row
        self._startup_lines: set[str] = set()
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
        noteworthy = False
        for r in results:
            error = r.info.get("error") if isinstance(r.info, dict) else None
            if error == "timeout":
                self.stats["timeouts"] += 1
            elif error is not None:
                self.stats["errors"] += 1
            printed = isinstance(r.info, dict) and bool(r.info.get("printed"))
            self.stats["printed_errors"] += printed
            noteworthy = noteworthy or error is not None or printed
        if noteworthy and self.on_errors is not None:
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
        if msg is not None and msg[0] == "ready":
            w.ready = True
            self._show_startup_output(msg[1])
            return
        if msg is not None and msg[0] == "init_error":
            raise RuntimeError(f"reward worker could not load task {type(self.task).__qualname__}:\n{msg[1]}")
        w.process.join(1.0)
        raise RuntimeError(f"reward worker exited during start-up (exit code {w.process.exitcode})")

    def _show_startup_output(self, lines: list[str]) -> None:
        """Error-looking lines a worker printed while loading the task: logged once each."""
        for line in lines:
            if line not in self._startup_lines:
                self._startup_lines.add(line)
                logging.getLogger("tinyrl").error("a reward worker printed while loading the task: %s", line)

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
                self._service(w, results, blame, pending)
        return results  # type: ignore[return-value]

    def _service(self, w: _Worker, results: list, blame: Callable[[_Worker, str], None], pending: deque) -> None:
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
                    rest, w.chunk = w.chunk[len(msg[1]) :], None
                    if rest:  # a retiring worker stopped early
                        pending.appendleft(rest)
                    if msg[2]:
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
            w.end()
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
