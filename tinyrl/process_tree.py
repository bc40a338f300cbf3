"""The processes a process started, found and ended through Linux's /proc (standard library only).

Reward workers use this to end every process a reward started (process pools, a `multiprocessing.Process` with a
timeout, a forked child that never ends) when a sample times out or a worker is replaced, and to give each of those
processes the per-sample CPU allowance the worker itself gets. Elsewhere (no /proc) every function finds nothing.
"""

from __future__ import annotations

import math
import os
import signal
import time

__all__ = ["descendants", "group_members", "kill_all", "reap_children", "cpu_seconds", "allow_cpu"]


# Linux lists each thread's children in /proc/PID/task/TID/children when built with CONFIG_PROC_CHILDREN (most are);
# otherwise parents are read from every process's stat file.
_LISTS_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (those started by any of its threads)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            pass
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _parents() -> dict[int, int]:
    """``{pid: parent pid}`` of every process (the slow way: one file per process)."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                out[int(name)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), parents before their children."""
    parents = None if _LISTS_CHILDREN else _parents()
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop(0)
        if parents is None:
            children = _children(current)
        else:
            children = [p for p, parent in parents.items() if parent == current]
        for child in children:
            if child not in found and child != pid:
                found.append(child)
                todo.append(child)
    return found


def group_members(pgid: int) -> list[int]:
    """Processes whose process group is ``pgid`` (orphans a dead worker left behind keep its group)."""
    members = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and int(fields[2]) == pgid:
                members.append(int(name))
    return members


def kill_all(pids: list[int] | set[int]) -> None:
    """SIGKILL each of ``pids`` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def reap_children(wait_s: float = 0.5) -> None:
    """Collect the exit status of this process's ended children, so none is left a zombie (for up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far, or None."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def allow_cpu(pid: int, seconds: float) -> None:
    """Let ``pid`` use ``seconds`` more CPU seconds (its RLIMIT_CPU soft limit, cumulative per process, moves on)."""
    import resource

    used = cpu_seconds(pid)
    if used is None or not hasattr(resource, "prlimit"):
        return
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_CPU)
        soft = math.ceil(used + seconds)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.prlimit(pid, resource.RLIMIT_CPU, (soft, hard))
    except (OSError, ValueError):
        pass
