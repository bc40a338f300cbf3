import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tinyrl.console import Progress
from tinyrl.metrics import (
    DISCARDED_FILE,
    METRICS_FILE,
    MetricsWriter,
    read_metrics,
    rewind_metrics,
    write_samples,
)

from tinyrl.task import Reward


def strict_json_lines(path):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_are_appended_as_strict_json_with_nonfinite_as_null(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"reward/mean": 0.25, "response/length_max": 17, "policy/kl": float("nan")})
        writer.write(2, {"reward/mean": torch.tensor(0.5), "optim/grad_norm": np.float32(float("inf"))})
        writer.write(3, {"reward/accuracy": np.array(0.75), "optim/skipped": True})
        assert writer.offset() == (tmp_path / METRICS_FILE).stat().st_size
    rows = strict_json_lines(tmp_path / METRICS_FILE)
    assert rows == [
        {"step": 1, "reward/mean": 0.25, "response/length_max": 17, "policy/kl": None},
        {"step": 2, "reward/mean": 0.5, "optim/grad_norm": None},
        {"step": 3, "reward/accuracy": 0.75, "optim/skipped": 1},
    ]
    assert read_metrics(tmp_path) == rows
    assert read_metrics(tmp_path / METRICS_FILE) == rows


def test_reopening_appends_and_never_rewrites(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"a": 1.0})
    first_bytes = (tmp_path / METRICS_FILE).read_bytes()
    with MetricsWriter(tmp_path) as writer:
        writer.write(2, {"a": 2.0})
    assert (tmp_path / METRICS_FILE).read_bytes().startswith(first_bytes)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_bad_values_are_rejected_naming_the_key(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(TypeError, match="metric 'sample/text' must be a number, got str"):
            writer.write(1, {"reward/mean": 1.0, "sample/text": "hello"})
        with pytest.raises(TypeError, match="metric 'rewards' must be a number, got Tensor"):
            writer.write(1, {"rewards": torch.ones(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write(1, {"step": 3})
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            writer.write(-1, {"a": 1.0})
    assert (tmp_path / METRICS_FILE).read_bytes() == b""  # nothing half-written


def test_rewind_moves_rows_of_rerun_steps_to_the_discard_file(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 4):
            writer.write(step, {"reward/mean": step / 10})
        checkpoint_offset = writer.offset()
        for step in range(4, 6):
            writer.write(step, {"reward/mean": step / 10})
    assert rewind_metrics(tmp_path, checkpoint_offset) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["step"] for r in strict_json_lines(tmp_path / DISCARDED_FILE)] == [4, 5]

    with MetricsWriter(tmp_path) as writer:  # the resumed run re-runs steps 4 and 5
        for step in range(4, 6):
            writer.write(step, {"reward/mean": step / 100})
    assert [r["reward/mean"] for r in read_metrics(tmp_path)] == [0.1, 0.2, 0.3, 0.04, 0.05]
    assert rewind_metrics(tmp_path, checkpoint_offset) == 2
    assert [r["reward/mean"] for r in strict_json_lines(tmp_path / DISCARDED_FILE)] == [0.4, 0.5, 0.04, 0.05]
    assert rewind_metrics(tmp_path, checkpoint_offset) == 0


def test_rewind_rejects_offsets_that_do_not_match_the_file(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"a": 1.0})
        size = writer.offset()
    with pytest.raises(ValueError, match=f"has {size} bytes, fewer than the checkpoint's offset {size + 10}"):
        rewind_metrics(tmp_path, size + 10)
    with pytest.raises(ValueError, match="not at a row boundary"):
        rewind_metrics(tmp_path, 3)
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        rewind_metrics(tmp_path, -1)
    with pytest.raises(FileNotFoundError, match="missing"):
        rewind_metrics(tmp_path / "elsewhere", 10)
    assert rewind_metrics(tmp_path / "elsewhere", 0) == 0


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from tinyrl.metrics import MetricsWriter

    writer = MetricsWriter(sys.argv[1])
    step = 0
    while True:
        step += 1
        writer.write(step, {"reward/mean": step * 0.5, "padding": float(step) * 1e-3})
        if step % 50 == 0:
            print(step, flush=True)
    """
)


def test_rows_survive_a_sigkilled_writer_and_a_torn_row_is_set_aside(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if int(line) >= 200:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    rows = read_metrics(tmp_path)
    assert len(rows) >= 200
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["reward/mean"] == r["step"] * 0.5 for r in rows)

    # A crash inside write() can leave part of a row; simulate those bytes and reopen.
    with open(tmp_path / METRICS_FILE, "ab") as f:
        f.write(b'{"step": 9999, "reward/me')
    assert len(read_metrics(tmp_path)) == len(rows)  # the torn row is skipped by readers
    with MetricsWriter(tmp_path) as writer:
        writer.write(len(rows) + 1, {"reward/mean": 0.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, len(rows) + 2))
    assert (tmp_path / DISCARDED_FILE).read_bytes() == b'{"step": 9999, "reward/me\n'


def test_malformed_middle_row_is_reported_with_its_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a": 1}\n{oops\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2 is not valid JSON"):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).write_text('{"a": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 is not an object with a 'step' key"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def test_tensorboard_sink_receives_finite_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        writer.write(1, {"reward/mean": 0.25, "policy/kl": float("nan")})
        writer.write(2, {"reward/mean": 0.75, "policy/kl": 0.01})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    reward = [(e.step, e.value) for e in events.Scalars("reward/mean")]
    assert reward == [(1, 0.25), (2, 0.75)]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("policy/kl")] == [(2, pytest.approx(0.01))]


def test_wandb_sink_offline_or_a_clear_install_message(tmp_path):
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ImportError, match=r"pip install 'tinyrl\[wandb\]'"):
            MetricsWriter(tmp_path, wandb={"mode": "offline", "project": "tinyrl-test"})
        assert not (tmp_path / METRICS_FILE).exists()
    else:
        with MetricsWriter(tmp_path, wandb={"mode": "offline", "project": "tinyrl-test"}) as writer:
            writer.write(1, {"reward/mean": 0.5})
        assert list((tmp_path / "wandb").glob("offline-run-*"))
        assert read_metrics(tmp_path) == [{"step": 1, "reward/mean": 0.5}]


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_plain_lines_are_rate_limited_with_eta():
    clock, out = ManualClock(), io.StringIO()
    progress = Progress(total_steps=100, stream=out, min_interval_s=30.0, clock=clock)
    assert not progress.tty
    clock.now = 2.0
    assert progress.update(1, {"reward": 0.41234, "acc": 0.3, "len": 212}) is True
    clock.now = 20.0
    assert progress.update(10, {"reward": 0.5}) is False  # 18 s after the last line
    clock.now = 40.0
    assert progress.update(20, {"reward": 0.55}) is True
    clock.now = 200.0
    assert progress.update(100, {"reward": 0.9}) is True  # the last step is always shown
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/100 [....................]   1% | 2 s/step | ETA 3:18 | reward 0.4123 | acc 0.3 | len 212"
    assert lines[1] == "step 20/100 [####................]  20% | 2 s/step | ETA 2:40 | reward 0.55"
    assert lines[2] == "step 100/100 [####################] 100% | 2 s/step | ETA 0:00 | reward 0.9"
    assert len(lines) == 3


def test_progress_disabled_writes_nothing():
    out = io.StringIO()
    progress = Progress(total_steps=2, stream=out, enabled=False)
    assert progress.update(1, {"reward": 0.5}) is False
    assert progress.update(2) is False
    progress.close()
    assert out.getvalue() == ""


def test_progress_eta_after_resume_counts_only_steps_run_here():
    clock, out = ManualClock(), io.StringIO()
    progress = Progress(total_steps=1000, start_step=900, stream=out, clock=clock)
    clock.now = 50.0
    progress.update(910)
    assert "| 5 s/step | ETA 7:30" in out.getvalue()
    long_clock = ManualClock()
    long_run = Progress(total_steps=2000, stream=io.StringIO(), clock=long_clock)
    long_clock.now = 40.0
    assert "| 4 s/step | ETA 2:12:40" in long_run.format(10)  # 1990 steps left at 4 s


def test_progress_redraws_in_place_on_a_terminal():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty_stream:
        clock = ManualClock()
        progress = Progress(total_steps=3, stream=tty_stream, clock=clock)
        assert progress.tty
        for step in (1, 2, 3):
            clock.now += 1.0
            progress.update(step, {"reward": step / 10})
    # the terminal side is closed: read what it holds until the pty reports its end (EIO on Linux)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    written = b"".join(chunks).decode()
    assert written.startswith("\rstep 1/3 [")
    assert written.count("\r\n") == 1 and written.endswith("reward 0.3\r\n")  # one final newline only
    assert "\rstep 2/3 [" in written


def make_rewards(pattern):
    table = {"C": (1.0, True, True), "F": (0.1, False, True), "X": (0.0, False, False)}
    return [Reward(score=table[p][0], correct=table[p][1], formatted=table[p][2], info={}) for p in pattern]


def test_samples_record_signals_and_a_readable_table(tmp_path):
    prompts = [f"Using [3, 5, 7] make {i}. Show | work" for i in range(8)]
    completions = ["<think>3+5</think>\n<answer>8</answer>", "<answer>1|2</answer>"] * 4
    rewards = make_rewards("CFFXCFFX")
    signals = write_samples(tmp_path, 10, prompts, completions, rewards, max_rows=3, response_lengths=[12, 6] * 4)
    assert signals["accuracy"] == 0.25
    assert signals["format_rate"] == 0.75
    assert signals["formatted_wrong_rate"] == 0.5
    assert signals["length_mean_tokens"] == 9.0
    assert signals["length_ratio_to_first"] == 1.0

    record = json.loads((tmp_path / "samples.jsonl").read_text(encoding="utf-8"))
    assert record["step"] == 10
    assert [row["index"] for row in record["rows"]] == [0, 4, 7]  # spread over the batch
    assert record["rows"][0]["completion"] == completions[0]
    assert record["rows"][2] == {
        "index": 7, "prompt": prompts[7], "completion": completions[7], "score": 0.0,
        "correct": False, "formatted": False, "length_tokens": 6,
    }

    md = (tmp_path / "samples.md").read_text(encoding="utf-8")
    assert md.startswith("# Sample completions")
    assert "## step 10" in md
    assert "formatted but wrong 0.500" in md
    # verbatim in code fences, readable in a terminal: no HTML escapes, newlines kept
    assert "```\n<think>3+5</think>\n<answer>8</answer>\n```" in md
    assert "```\n<answer>1|2</answer>\n```" in md and "&lt;" not in md and "<br>" not in md
    assert md.count("### completion ") == 3 and "### completion 7 · score 0 · correct no · formatted no" in md

    shorter = ["<answer>8</answer>"] * 8
    later = write_samples(tmp_path, 20, prompts, shorter, make_rewards("FFFFFFFF"))
    assert later["length_ratio_to_first"] == pytest.approx(len(shorter[0]) / signals["length_mean_chars"])
    assert later["formatted_wrong_rate"] == 1.0
    md = (tmp_path / "samples.md").read_text(encoding="utf-8")
    assert md.count("# Sample completions") == 1 and "## step 20" in md
    assert len((tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_samples_md_fences_cannot_be_closed_by_the_completion(tmp_path):
    hostile = "```\n# not a heading\n````"
    write_samples(tmp_path, 1, ["p"], [hostile], make_rewards("X"))
    md = (tmp_path / "samples.md").read_text(encoding="utf-8")
    assert "`````\n" + hostile + "\n`````" in md  # a fence longer than any backtick run inside


def test_samples_truncate_long_text_and_validate_inputs(tmp_path):
    long = "x" * 5000
    write_samples(tmp_path, 1, ["p" * 1000], [long], make_rewards("X"), max_chars=100)
    md = (tmp_path / "samples.md").read_text(encoding="utf-8")
    assert "x" * 100 + "… [+4900 chars]" in md and "x" * 101 not in md
    assert "…" + "p" * 50 + "\n```" in md
    record = json.loads((tmp_path / "samples.jsonl").read_text(encoding="utf-8"))
    assert record["rows"][0]["completion"] == long  # the JSONL keeps the full text
    with pytest.raises(ValueError, match=r"prompts \(1\), completions \(2\) and rewards \(2\)"):
        write_samples(tmp_path, 2, ["p"], ["a", "b"], make_rewards("CX"))
    with pytest.raises(ValueError, match="completions is empty"):
        write_samples(tmp_path, 2, [], [], [])
    with pytest.raises(TypeError, match=r"rewards\[0\] has no .score"):
        write_samples(tmp_path, 2, ["p"], ["a"], [1.0])
    assert math.isfinite(write_samples(tmp_path, 3, ["p"], [""], make_rewards("X"))["length_ratio_to_first"])
