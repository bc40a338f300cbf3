"""Shared fixtures: a tiny Qwen2 model and tokenizer built once per test session, offline."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tinyrl.models import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_model(path, TINY_TEXTS, vocab_size=320, hidden_size=64, num_heads=2, num_kv_heads=1,
                            intermediate_size=128, num_layers=2, seed=0)
