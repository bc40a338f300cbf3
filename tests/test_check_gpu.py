"""benchmarks/check_gpu.py, the GPU check, in its CPU form: the same cases on a tiny bf16 tied-embedding model, so
the script cannot rot between the GPU runs it exists for. Without vLLM (the main CI venv) the vLLM cases are
skipped, and say so; in the vLLM venv (.ci/run) they run: colocated engine, server (disk sync), two torchrun
ranks, each checking vLLM's log-probs against the trainer's after every weight sync."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_gpu.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_every_case_the_cpu_allows_and_passes(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500)
    lines = {line.split()[1].rstrip(":"): line.split()[0] for line in done.stdout.splitlines()
             if line.split() and line.split()[0] in ("PASS", "FAIL", "SKIP")}
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert lines["master-weights"] == "PASS"
    assert "trainable_dtypes=[torch.float32]" in done.stdout
    assert lines["cpu-offload-clip"] == lines["vllm-tp2"] == "SKIP"
    vllm = importlib.util.find_spec("vllm") is not None
    for case in ("vllm-colocated", "server", "torchrun-colocated", "lora-vllm"):
        assert lines[case] == ("PASS" if vllm else "SKIP"), done.stdout
    if not vllm:
        assert "SKIP vllm-colocated: vLLM is not installed" in done.stdout


@pytest.mark.parametrize("gpus, runnable", [
    (0, set()),
    (1, {"master-weights", "vllm-colocated", "cpu-offload-clip", "lora-vllm"}),
    (2, {"master-weights", "vllm-colocated", "server", "torchrun-colocated", "vllm-tp2", "cpu-offload-clip",
         "lora-vllm"}),
])
def test_the_gpu_check_runs_what_the_hardware_allows(gpus, runnable):
    check = _script()
    assert {c for c in check.CASES if check.skip_reason(c, False, gpus, True) is None} == runnable
    assert {c for c in check.CASES if check.skip_reason(c, False, gpus, False) is None} == runnable - set(check.VLLM_CASES)
