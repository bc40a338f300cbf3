"""Failure handling for the training loop: per-phase timing and error context, non-finite guards, timeouts,
stop signals.

Every error that escapes a phase names the step and the phase it happened in; an out-of-memory error also
names the config keys that reduce memory; a NaN/inf loss skips the update until a limit is reached; a call that
may hang (weight sync, generation) raises `TimeoutError` instead; SIGTERM and SIGINT ask a loop to stop after its
current step (`stop_requests`) instead of killing it mid-write.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from tinyrl import devices

__all__ = [
    "DEFAULT_MEMORY_KNOBS",
    "TrainingError",
    "PhaseTimer",
    "NonFiniteGuard",
    "call_with_timeout",
    "is_out_of_memory",
    "stop_requests",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Config keys that lower peak memory, in the order worth trying.
DEFAULT_MEMORY_KNOBS: tuple[str, ...] = (
    "trainer.micro_batch_tokens",
    "model.gradient_checkpointing",
    "rollout.gpu_memory_utilization",
    "rollout.max_response_tokens",
    "trainer.prompts_per_step",
)


class TrainingError(RuntimeError):
    """An error in the training loop, tagged with the step and the phase it happened in."""

    def __init__(self, message: str, step: int | None = None, phase: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.phase = phase


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError and for RuntimeErrors whose message says 'out of memory'."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class PhaseTimer:
    """Seconds spent per phase of the current step, and step/phase context on every error.

    Usage: `with timer.phase("generate", step): ...`. Entering a phase of a new step clears the previous
    step's figures; a phase entered twice in one step accumulates. `metrics()` gives `time/<phase>` values.
    `on_phase(step, name)`, when given, is called as each phase starts (e.g. to post progress elsewhere).
    Exceptions (not KeyboardInterrupt/SystemExit, which pass through untouched so Ctrl-C can checkpoint) are
    re-raised as `TrainingError("step S, phase P: ...")` chained to the original.
    """

    def __init__(
        self,
        memory_knobs: Sequence[str] = DEFAULT_MEMORY_KNOBS,
        clock: Callable[[], float] = time.perf_counter,
        on_phase: Callable[[int, str], None] | None = None,
    ) -> None:
        self.memory_knobs = tuple(memory_knobs)
        self.on_phase = on_phase
        self.seconds: dict[str, float] = {}
        self.step: int | None = None
        self._clock = clock

    @contextlib.contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"PhaseTimer.phase: name must be a non-empty string, got {name!r}")
        if step != self.step:
            self.step = step
            self.seconds = {}
        if self.on_phase is not None:
            self.on_phase(step, name)
        start = self._clock()
        try:
            yield
        except TrainingError:
            raise  # already tagged by an inner phase
        except Exception as exc:
            raise self._wrap(exc, name, step) from exc
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + (self._clock() - start)

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """The current step's phase times as metrics, e.g. {"time/generate": 1.2}."""
        return {f"{prefix}{name}": seconds for name, seconds in self.seconds.items()}

    def _wrap(self, exc: Exception, name: str, step: int) -> TrainingError:
        detail = f"{type(exc).__name__}: {exc}"
        if is_out_of_memory(exc):
            knobs = ", ".join(self.memory_knobs)
            message = (
                f"step {step}, phase {name}: out of memory ({detail}). "
                f"To reduce memory, lower or enable one of: {knobs}"
            )
        else:
            message = f"step {step}, phase {name}: {detail}"
        return TrainingError(message, step=step, phase=name)


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"expected a scalar tensor, got shape {tuple(value.shape)}")
        return float(value.detach().float().item())
    return float(value)


class NonFiniteGuard:
    """Skip updates whose loss or gradient norm is NaN/inf; stop the run when they keep coming.

    With `consecutive=True` (default) the count resets after a finite step, so a rare bad batch never stops a
    run but a run that has diverged does; with `consecutive=False` every bad step since the start counts.
    The `max_bad_steps`-th counted bad step raises `TrainingError`.
    """

    def __init__(self, max_bad_steps: int = 5, consecutive: bool = True) -> None:
        if isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) or max_bad_steps < 1:
            raise ValueError(f"NonFiniteGuard: max_bad_steps must be an int >= 1, got {max_bad_steps!r}")
        self.max_bad_steps = max_bad_steps
        self.consecutive = consecutive
        self.bad_count = 0  # the count compared with max_bad_steps
        self.total_skipped = 0

    def check(self, step: int, loss: Any, grad_norm: Any | None = None) -> bool:
        """Return True when this step's update must be skipped (loss or grad norm not finite)."""
        bad = []
        loss_value = _as_float(loss)
        if not math.isfinite(loss_value):
            bad.append(f"loss={loss_value}")
        if grad_norm is not None:
            grad_value = _as_float(grad_norm)
            if not math.isfinite(grad_value):
                bad.append(f"grad_norm={grad_value}")
        if not bad:
            if self.consecutive:
                self.bad_count = 0
            return False
        self.bad_count += 1
        self.total_skipped += 1
        kind = "consecutive" if self.consecutive else "total"
        if self.bad_count >= self.max_bad_steps:
            raise TrainingError(
                f"step {step}, phase update: non-finite {' and '.join(bad)}; {self.bad_count} {kind} bad steps "
                f"reached the limit max_bad_steps={self.max_bad_steps}, the run has diverged. Lower the learning "
                f"rate, enable gradient clipping, or resume from an earlier checkpoint.",
                step=step,
                phase="update",
            )
        logger.warning(
            "step %d: non-finite %s, update skipped (%d/%d %s)",
            step, " and ".join(bad), self.bad_count, self.max_bad_steps, kind,
        )
        return True

    def state_dict(self) -> dict[str, int]:
        """Counters to store in a checkpoint so a resumed run stops at the same point."""
        return {"bad_count": self.bad_count, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("bad_count", "total_skipped"):
            if key not in state:
                raise KeyError(f"NonFiniteGuard.load_state_dict: missing key {key!r}")
        self.bad_count = int(state["bad_count"])
        self.total_skipped = int(state["total_skipped"])


def call_with_timeout(fn: Callable[..., T], timeout_s: float, what: str, *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` in a daemon thread; raise TimeoutError naming `what` if it overruns `timeout_s`.

    The result or the exception of `fn` is passed through. The thread gets the caller's context variables and
    the caller's current CUDA device (CUDA's is per thread, and a new thread starts on device 0). Python cannot
    stop a thread, so after a timeout `fn` may still be running in the background: treat whatever it was driving
    (an engine, a connection) as broken. `timeout_s=math.inf` calls `fn` directly.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"call_with_timeout: timeout_s for {what!r} must be a number > 0, got {timeout_s!r}")
    if math.isinf(timeout_s):
        return fn(*args, **kwargs)

    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()
    device = devices.current_cuda_device()

    def target() -> None:
        try:
            devices.use_device(device)
            outcome["value"] = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"timeout:{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, int | None]]:
    """While the block runs, SIGTERM and SIGINT set `stop["signal"]` instead of interrupting, so a loop finishes
    its current step, saves, and stops; the previous handlers come back afterwards."""
    stop: dict[str, int | None] = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
