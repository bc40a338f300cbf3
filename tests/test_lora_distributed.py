"""LoRA under torchrun (FSDP2, gloo, CPU): two ranks compute what one process computes, adapters included.

The adapters live inside the decoder layers PEFT adapted, so each layer's FSDP unit shards them with the frozen
base weights (dim 0 split over the ranks), like every other parameter; see README "LoRA".
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

pytest.importorskip("peft")  # the `lora` extra; the test extra and CI install it

from tinyrl.compose import load_config  # noqa: E402
from tinyrl.experiment import train  # noqa: E402

from test_distributed import (  # noqa: E402
    STEPS, _assert_rows_close, _assert_weights_close, _overrides, _rows, _two_ranks,
)

LORA = ("algorithm=grpo", "algorithm.kl_coef=0.01", "model.lora.enabled=true", "model.lora.rank=4",
        "model.lora.alpha=8", "model.lora.dropout=0.0", "trainer.lr=1e-2")


def test_two_rank_lora_run_equals_the_one_process_run(tiny_model_dir, tmp_path):
    train(load_config(_overrides(tiny_model_dir, tmp_path / "one", *LORA)))
    _two_ranks(tiny_model_dir, tmp_path / "two", *LORA)
    _assert_rows_close(_rows(tmp_path / "two"), _rows(tmp_path / "one"))
    final = f"checkpoints/step_{STEPS:08d}"
    for part in ("actor/model.safetensors", "adapter/adapter_model.safetensors"):
        one, two = load_file(str(tmp_path / "one" / final / part)), load_file(str(tmp_path / "two" / final / part))
        _assert_weights_close(two, one, atol=5e-5)
    rows = [r for r in _rows(tmp_path / "one") if "policy/kl" in r]
    assert rows[-1]["policy/kl"] > 0  # the reference (adapters disabled) differs from the trained policy
