import contextvars
import logging
import math
import threading

import pytest
import torch

from tinyrl.monitor import DEFAULT_MEMORY_KNOBS, NonFiniteGuard, PhaseTimer, TrainingError, call_with_timeout


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phase_timer_records_accumulates_and_resets_per_step():
    clock = ManualClock()
    timer = PhaseTimer(clock=clock)
    with timer.phase("generate", step=1):
        clock.now += 2.5
    with timer.phase("update", step=1):
        clock.now += 1.0
    with timer.phase("generate", step=1):  # a second generate pass in the same step adds up
        clock.now += 0.5
    assert timer.seconds == {"generate": 3.0, "update": 1.0}
    assert timer.metrics() == {"time/generate": 3.0, "time/update": 1.0}
    with timer.phase("generate", step=2):
        clock.now += 4.0
    assert timer.seconds == {"generate": 4.0}
    assert timer.step == 2


def test_phase_error_names_step_and_phase_and_chains_the_cause():
    clock = ManualClock()
    timer = PhaseTimer(clock=clock)
    with pytest.raises(TrainingError) as info:
        with timer.phase("update", step=7):
            clock.now += 0.25
            torch.ones(2, 3) @ torch.ones(2, 3)  # a real shape error from torch
    err = info.value
    assert str(err).startswith("step 7, phase update: RuntimeError: ")
    assert "mat1 and mat2 shapes cannot be multiplied" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    assert (err.step, err.phase) == (7, "update")
    assert timer.seconds == {"update": 0.25}  # the failed phase's time is still recorded


def test_nested_phases_tag_the_innermost_phase_once():
    timer = PhaseTimer()
    with pytest.raises(TrainingError) as info:
        with timer.phase("step", step=3):
            with timer.phase("score", step=3):
                raise ValueError("verifier returned 2.0, outside [0, 1]")
    assert str(info.value) == "step 3, phase score: ValueError: verifier returned 2.0, outside [0, 1]"


def test_keyboard_interrupt_passes_through_untouched():
    timer = PhaseTimer()
    with pytest.raises(KeyboardInterrupt):
        with timer.phase("generate", step=1):
            raise KeyboardInterrupt
    assert "generate" in timer.seconds


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
    ],
)
def test_out_of_memory_message_names_the_memory_knobs(exc):
    timer = PhaseTimer()
    with pytest.raises(TrainingError) as info:
        with timer.phase("update", step=12):
            raise exc
    message = str(info.value)
    assert message.startswith("step 12, phase update: out of memory")
    for knob in DEFAULT_MEMORY_KNOBS:
        assert knob in message
    assert info.value.__cause__ is exc


def test_out_of_memory_knobs_come_from_the_caller():
    timer = PhaseTimer(memory_knobs=["rollout.max_num_seqs", "trainer.micro_batch_tokens"])
    with pytest.raises(TrainingError, match="rollout.max_num_seqs, trainer.micro_batch_tokens"):
        with timer.phase("generate", step=1):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_guard_skips_a_nan_update_on_a_real_model(caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.ones(1, 4)).sum() * float("nan")
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    guard = NonFiniteGuard(max_bad_steps=3)
    with caplog.at_level(logging.WARNING, logger="tinyrl.monitor"):
        skip = guard.check(step=5, loss=loss, grad_norm=grad_norm)
    if not skip:
        optimizer.step()
    assert skip is True
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "step 5: non-finite loss=nan and grad_norm=nan, update skipped (1/3 consecutive)" in caplog.text


def test_guard_consecutive_count_resets_and_stops_a_diverged_run():
    guard = NonFiniteGuard(max_bad_steps=3)
    assert guard.check(1, math.nan) is True
    assert guard.check(2, 0.5, grad_norm=math.inf) is True
    assert guard.check(3, torch.tensor(0.3), grad_norm=torch.tensor(1.2)) is False  # resets the count
    assert guard.check(4, math.inf) is True
    assert guard.check(5, math.nan) is True
    with pytest.raises(TrainingError, match=r"step 6, phase update: non-finite loss=nan; 3 consecutive bad steps"):
        guard.check(6, torch.tensor(float("nan")))
    assert guard.total_skipped == 5


def test_guard_total_mode_counts_every_bad_step():
    guard = NonFiniteGuard(max_bad_steps=2, consecutive=False)
    assert guard.check(1, math.nan) is True
    assert guard.check(2, 1.0) is False
    with pytest.raises(TrainingError, match="2 total bad steps"):
        guard.check(3, math.nan)


def test_guard_state_round_trips_for_resume():
    guard = NonFiniteGuard(max_bad_steps=2)
    guard.check(1, math.nan)
    resumed = NonFiniteGuard(max_bad_steps=2)
    resumed.load_state_dict(guard.state_dict())
    with pytest.raises(TrainingError):
        resumed.check(2, math.nan)
    with pytest.raises(KeyError, match="bad_count"):
        resumed.load_state_dict({"total_skipped": 1})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_guard_rejects_bad_limit(bad):
    with pytest.raises(ValueError, match="max_bad_steps"):
        NonFiniteGuard(max_bad_steps=bad)


def test_call_with_timeout_returns_the_result_and_passes_arguments():
    assert call_with_timeout(divmod, 5.0, "division", 17, 5) == (3, 2)
    assert call_with_timeout(lambda *, x: x * 2, 5.0, "kwargs", x=21) == 42


def test_call_with_timeout_reraises_the_callees_exception():
    error = ConnectionError("weight sync socket closed")

    def fail():
        raise error

    with pytest.raises(ConnectionError) as info:
        call_with_timeout(fail, 5.0, "weight sync")
    assert info.value is error


def test_call_with_timeout_raises_instead_of_hanging():
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError, match=r"^weight sync to the rollout engine did not finish within 0.2 s"):
            call_with_timeout(release.wait, 0.2, "weight sync to the rollout engine")
    finally:
        release.set()  # let the abandoned thread end


def test_call_with_timeout_carries_context_variables():
    current_step = contextvars.ContextVar("current_step")
    current_step.set(11)
    assert call_with_timeout(current_step.get, 5.0, "read context") == 11


def test_call_with_timeout_without_limit_runs_in_the_callers_thread():
    assert call_with_timeout(threading.current_thread, math.inf, "no limit") is threading.current_thread()


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, "10"])
def test_call_with_timeout_rejects_bad_limits(bad):
    with pytest.raises(ValueError, match="timeout_s for 'generation'"):
        call_with_timeout(print, bad, "generation")
