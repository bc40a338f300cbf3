"""The Task protocol, the Reward result, the task registry, and parallel reward scoring.

This module uses the standard library only: reward worker processes import it, and so does code that must run
without torch.

A task is one small object that makes seeded problem sets, renders prompts, and scores completions:

    @register_task("my_task")
    class MyTask:
        name = "my_task"
        stop = ("</answer>",)
        chat_prefix = ""
        def dataset(self, split, size, seed): ...
        def prompt(self, row): ...
        def messages(self, row): ...
        def reward(self, completion, row): ...

``get_task("my_task")``, ``get_task("pkg.module:MyTask")`` and ``get_task("path/to/file.py:MyTask")`` all build it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

__all__ = [
    "Reward",
    "Task",
    "SPLITS",
    "register_task",
    "get_task",
    "available_tasks",
    "RewardScorer",
    "score_batch",
]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Reward:
    """The verdict on one completion."""

    score: float
    correct: bool  # the accuracy signal, separate from the (possibly shaped) score
    formatted: bool  # an answer in the expected format was found
    info: dict = field(default_factory=dict)  # why: e.g. {"reason": "wrong numbers"} or {"error": "timeout"}


class Task(Protocol):
    """What the trainer, the data exporter and the evaluator need from a task."""

    name: str
    stop: tuple[str, ...]  # stop strings for generation; engines must keep them in the returned text
    chat_prefix: str  # text the assistant turn begins with in chat form ("" if none)

    def dataset(self, split: str, size: int, seed: int) -> list[dict]:
        """``size`` distinct problems of ``split`` (one of SPLITS), the same for the same seed."""
        ...

    def prompt(self, row: dict) -> str:
        """Base-model template; the model continues this text."""
        ...

    def messages(self, row: dict) -> list[dict]:
        """Chat form: ``[{"role": "system" | "user", "content": ...}]``."""
        ...

    def reward(self, completion: str, row: dict) -> Reward:
        """Score one completion of ``row``'s prompt."""
        ...


_TASK_MEMBERS = ("name", "stop", "chat_prefix", "dataset", "prompt", "messages", "reward")

# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Any]] = {}
# Built-in tasks register themselves when their module is imported; get_task imports it on first use.
_BUILTIN_MODULES = {"countdown": "tinyrl.tasks.countdown"}
# Modules that get_task loaded from a file path: {module name: path}. Worker processes load them again under the
# same names so that pickled tasks defined in such files can be rebuilt there.
_FILE_MODULES: dict[str, str] = {}


def register_task(name: str, factory: Callable[..., Any] | None = None):
    """Register ``factory`` (a class or function returning a task) under ``name``.

    Use as ``register_task("x", MyTask)`` or as a decorator ``@register_task("x")``. Registering the same
    name again is allowed only for the same factory (e.g. its module was imported twice).
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_task: name must be a non-empty string without ':', got {name!r}")

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError(f"register_task({name!r}): factory must be callable, got {fn!r}")
        old = _REGISTRY.get(name)
        if old is not None and old is not fn and _qualified_name(old) != _qualified_name(fn):
            raise ValueError(
                f"register_task: task name {name!r} is already registered to {_qualified_name(old)}; "
                f"choose another name for {_qualified_name(fn)}"
            )
        _REGISTRY[name] = fn
        return fn

    return add if factory is None else add(factory)


def available_tasks() -> list[str]:
    """Names that ``get_task`` accepts without a module or file path."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def get_task(name: str, **kwargs: Any) -> Task:
    """Build a task from a registered name, ``"pkg.module:Attr"`` or ``"path/to/file.py:Attr"``.

    Unknown names raise ValueError listing the available tasks; keyword arguments the factory does not accept
    raise TypeError naming them.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"get_task: name must be a non-empty string, got {name!r}")
    factory = _resolve_factory(name)
    _check_kwargs(name, factory, kwargs)
    task = factory(**kwargs)
    missing = [m for m in _TASK_MEMBERS if not hasattr(task, m)]
    if missing:
        raise TypeError(f"get_task({name!r}) built {type(task).__name__}, which lacks Task member(s) {missing}")
    return task


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _resolve_factory(name: str) -> Callable[..., Any]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
        if name in _REGISTRY:
            return _REGISTRY[name]
        raise RuntimeError(f"module {_BUILTIN_MODULES[name]} did not register task {name!r}")
    where, sep, attr = name.rpartition(":")
    if not sep:
        raise ValueError(
            f"unknown task {name!r}; available tasks: {', '.join(available_tasks())} "
            f"(or give 'pkg.module:Attr' or 'path/to/file.py:Attr')"
        )
    if not attr or not where:
        raise ValueError(f"task spec {name!r} must look like 'pkg.module:Attr' or 'path/to/file.py:Attr'")
    module = _load_file_module(where) if where.endswith(".py") else _import_module(where, name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"task spec {name!r}: {where} has no attribute {attr!r}") from None


def _import_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"task spec {spec!r}: cannot import module {module_name!r} ({exc})") from exc


def _load_file_module(path_text: str):
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path_text} (resolved to {path})")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"tinyrl_file_task_{_identifier(path.stem)}_{digest}"
    module = sys.modules.get(module_name) or _exec_file_module(module_name, str(path))
    _FILE_MODULES[module_name] = str(path)
    return module


def _identifier(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in text)


def _exec_file_module(module_name: str, path: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load Python file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict) -> None:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the call report it
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"task {name!r} got unknown argument(s) {', '.join(unknown)}; it accepts: {', '.join(sorted(accepted))}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Scoring one sample (shared by the in-process path and the workers)
# ----------------------------------------------------------------------------------------------------------------


class _SampleTimeout(BaseException):
    """Raised inside a worker by SIGALRM; a BaseException so a reward's ``except Exception`` cannot swallow it."""


_ALARM_ARMED = [False]


def _on_alarm(signum, frame):
    if _ALARM_ARMED[0]:
        raise _SampleTimeout()


def _error_reward(error: str) -> Reward:
    return Reward(0.0, False, False, {"error": error})


def _score_one(task: Any, completion: str, row: dict, alarm_after: float | None) -> Reward:
    """``task.reward`` with every failure turned into a zero reward that records the error."""
    try:
        try:
            _ALARM_ARMED[0] = alarm_after is not None
            if alarm_after is not None:
                signal.setitimer(signal.ITIMER_REAL, alarm_after)
            reward = task.reward(completion, row)
        finally:
            _ALARM_ARMED[0] = False
            if alarm_after is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _SampleTimeout:
        return _error_reward("timeout")
    except (Exception, SystemExit) as exc:
        return _error_reward(f"{type(exc).__name__}: {exc}")
    if not isinstance(reward, Reward):
        return _error_reward(f"reward returned {type(reward).__name__}, not Reward")
    return reward


# ----------------------------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------------------------
#
# Protocol: the parent sends a chunk as a list of (completion, row) pairs, or None to stop. Before each sample the
# worker writes (index in chunk, start time) into a shared array, so when the parent kills a stuck worker or sees
# one die it knows which sample to blame; the worker answers once per chunk with ("done", [reward tuples]).
# Worker-to-parent messages: ("ready",), ("init_error", text), ("done", results).


def _worker_main(conn, task_bytes: bytes, file_modules: list[tuple[str, str]], progress, timeout: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    try:
        for module_name, path in file_modules:
            if module_name not in sys.modules:
                _exec_file_module(module_name, path)
        task = pickle.loads(task_bytes)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    alarm_after = None
    if hasattr(signal, "setitimer"):
        signal.signal(signal.SIGALRM, _on_alarm)
        alarm_after = timeout
    conn.send(("ready",))
    while True:
        try:
            chunk = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if chunk is None:
            return
        out = []
        for i, (completion, row) in enumerate(chunk):
            progress[0] = i
            progress[1] = time.monotonic()
            r = _score_one(task, completion, row, alarm_after)
            out.append((r.score, r.correct, r.formatted, r.info))
        progress[1] = 0.0
        try:
            conn.send(("done", out))
        except Exception:  # a reward put something into info that cannot cross processes; nothing was sent
            conn.send(("done", [_picklable(result) for result in out]))


_START_TIMEOUT = 300.0  # seconds a new worker may take to import the task's modules


def _file_modules_in(task_bytes: bytes) -> list[tuple[str, str]]:
    """The file-loaded modules a pickled task refers to (a pickle names the module of every class it holds)."""
    return sorted((name, path) for name, path in _FILE_MODULES.items() if name.encode() in task_bytes)


def _picklable(result: tuple) -> tuple:
    try:
        pickle.dumps(result)
        return result
    except Exception as exc:
        return (0.0, False, False, {"error": f"reward info cannot be sent between processes: {exc}"})


class _Worker:
    def __init__(self, ctx, task_bytes: bytes, timeout: float):
        self.progress = ctx.RawArray("d", 2)
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.conn = parent_conn
        self.process = ctx.Process(
            target=_worker_main,
            args=(child_conn, task_bytes, _file_modules_in(task_bytes), self.progress, timeout),
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


class RewardScorer:
    """Scores completions with ``task.reward`` in persistent worker processes, with a per-sample time limit.

    A reward that raises scores 0 with the error in ``info["error"]``; one that runs longer than ``timeout``
    seconds scores 0 with ``info["error"] == "timeout"``; one that kills its worker (os._exit, a segfault)
    scores 0 and the worker is replaced. The batch always completes and keeps input order.

    Workers are started with the "spawn" method (the trainer process holds torch threads, which fork would
    copy in a broken state); they receive the pickled task once. Inside a worker a timer signal interrupts a
    slow reward at ``timeout``; a computation stuck in C code ignores it, so the parent kills the worker after
    ``timeout`` plus a grace period and starts a new one.

    ``workers=0`` scores in this process: exceptions are still caught, but there is no time limit.
    """

    def __init__(self, task: Task, workers: int = 2, timeout: float = 2.0):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"RewardScorer: workers must be an integer >= 0, got {workers!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
            raise ValueError(f"RewardScorer: timeout must be a positive number of seconds, got {timeout!r}")
        if not callable(getattr(task, "reward", None)):
            raise TypeError(f"RewardScorer: {type(task).__name__} has no callable reward(completion, row)")
        self.task = task
        self.workers = workers
        self.timeout = float(timeout)
        self.kill_after = self.timeout + min(1.0, self.timeout)  # the in-worker signal gets a chance first
        self.stats = {"scored": 0, "errors": 0, "timeouts": 0, "worker_restarts": 0}
        self._pool: list[_Worker] = []
        self._failed_starts = 0  # replacement workers that died before they were ready, in a row
        self._closed = False
        if workers == 0:
            return
        try:
            self._task_bytes = pickle.dumps(task)
        except Exception as exc:
            raise TypeError(
                f"RewardScorer: task {type(task).__qualname__} cannot be pickled for worker processes ({exc}); "
                "define it at module level or use workers=0"
            ) from exc
        self._ctx = multiprocessing.get_context("spawn")
        self._finalizer = weakref.finalize(self, _stop_workers, self._pool)
        self._pool.extend(_Worker(self._ctx, self._task_bytes, self.timeout) for _ in range(workers))
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

    def score(self, completions: list[str], rows: list[dict]) -> list[Reward]:
        """One Reward per completion, in input order; ``rows[i]`` is the problem ``completions[i]`` answers."""
        if self._closed:
            raise RuntimeError("RewardScorer.score called after close()")
        completions, rows = list(completions), list(rows)
        if len(completions) != len(rows):
            raise ValueError(f"RewardScorer.score: {len(completions)} completions but {len(rows)} rows")
        for i, c in enumerate(completions):
            if not isinstance(c, str):
                raise TypeError(f"RewardScorer.score: completions[{i}] is {type(c).__name__}, not str")
        if self.workers == 0:
            results = [_score_one(self.task, c, r, None) for c, r in zip(completions, rows)]
        else:
            results = self._score_in_workers(completions, rows)
        self.stats["scored"] += len(results)
        for r in results:
            error = r.info.get("error") if isinstance(r.info, dict) else None
            if error == "timeout":
                self.stats["timeouts"] += 1
            elif error is not None:
                self.stats["errors"] += 1
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
        fresh = _Worker(self._ctx, self._task_bytes, self.timeout)
        self._pool[self._pool.index(w)] = fresh
        self.stats["worker_restarts"] += 1
        return fresh

    def _score_in_workers(self, completions: list[str], rows: list[dict]) -> list[Reward]:
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
            results[chunk[at]] = _error_reward(error)
            rest = chunk[:at] + chunk[at + 1 :]
            if rest:
                pending.appendleft(rest)

        while pending or any(w.chunk is not None for w in self._pool):
            for w in self._pool:
                if w.ready and w.chunk is None and pending:
                    chunk = pending.popleft()
                    try:
                        payload = pickle.dumps([(completions[i], rows[i]) for i in chunk])
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
                    for i, (score, correct, formatted, info) in zip(w.chunk, msg[1]):
                        results[i] = Reward(score, correct, formatted, info)
                    w.chunk = None
                elif kind == "init_error":
                    raise RuntimeError(f"reward worker could not load task after a restart:\n{msg[1]}")
                return
        if not w.process.is_alive():
            w.process.join()
            if not w.ready:
                self._failed_starts += 1
                if self._failed_starts > 3:
                    raise RuntimeError(f"reward workers keep exiting during start-up (exit code {w.process.exitcode})")
            blame(w, f"worker died (exit code {w.process.exitcode})")
            self._replace(w)
            return
        started = w.running_since()
        if started is not None and time.monotonic() - started > self.kill_after:
            w.process.kill()
            w.process.join()
            blame(w, "timeout")
            self._replace(w)


def score_batch(
    task: Task, completions: list[str], rows: list[dict], workers: int = 2, timeout: float = 2.0
) -> list[Reward]:
    """Score one batch with a throw-away RewardScorer (prefer one long-lived RewardScorer for many batches)."""
    with RewardScorer(task, workers=workers, timeout=timeout) as scorer:
        return scorer.score(completions, rows)
