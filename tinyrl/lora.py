"""LoRA training: low-rank adapters on a frozen base model, built and saved with PEFT.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models": each targeted linear layer computes

    h = W x + (alpha / r) * B A x        W: [out, in] frozen; A: [r, in], B: [out, r] trained; B starts at 0,

so the adapted model starts as the base model. The trainer keeps the Hugging Face model object it was given
(PEFT replaces the targeted `nn.Linear` modules inside it by LoRA layers, in place), so every pass, the
transformers engine and FSDP see the same module tree as in full training. What LoRA adds is here:

- `add_adapters`: inject the adapters, freeze everything else (and keep the frozen base in the compute dtype);
- `adapters_disabled`: the base model itself, the reference policy of the KL term without a second copy;
- `merged_weights`: W' = W + (alpha / r) B A under the base model's Hugging Face names, streamed one layer at a
  time, for rollout engines that load weights and for the checkpoint's `actor/` (what vLLM and `tinyrl-eval` load);
- `adapter_weights`, `AdapterFiles`: the adapter alone in PEFT's format (`PeftModel.from_pretrained` loads it),
  and `load_adapter_weights` to resume from it exactly.

PEFT is an optional dependency (`pip install 'tinyrl[lora]'`); it is imported only when `model.lora.enabled`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

ADAPTER = "default"  # PEFT's adapter name; the only adapter a run trains
ADAPTER_DIR = "adapter"  # inside a checkpoint, beside actor/ (the merged model)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's names
_LORA_PART = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\." + ADAPTER + r"\.weight$")
_BASE_PART = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


def peft_config(lora, base_path: str | None = None, targets: list[str] | None = None):
    """PEFT's `LoraConfig` for `model.lora` (`tinyrl.config.LoraConfig`); `targets` replaces its target modules
    (the module names `all-linear` resolved to, as PEFT itself records them)."""
    from peft import LoraConfig

    if targets is None:
        targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base_path,
    )


def add_adapters(model, lora, frozen_dtype: torch.dtype = torch.float32, base_path: str | None = None):
    """Inject LoRA adapters into `model` in place and return it (the same Hugging Face model object).

    Only the adapters (float32) require gradients afterwards; the frozen base is cast to `frozen_dtype` (the
    compute dtype: nothing updates it, so it needs no float32 master copy). Raises ValueError naming
    `model.lora.target_modules` when they match no linear layer of the model.
    """
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, peft_config(lora, base_path), adapter_name=ADAPTER)
    except ValueError as err:  # PEFT: "Target modules {...} not found in the base model"
        raise ValueError(f"model.lora.target_modules: {err}".splitlines()[0]) from err
    if wrapped.base_model.model is not model:  # the trainer keeps the object it was given
        raise RuntimeError("PEFT did not adapt the model in place; tinyrl needs peft>=0.17,<0.22")
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()
        elif param.is_floating_point() and param.dtype != frozen_dtype:
            param.data = param.data.to(frozen_dtype)
    checkpointing = getattr(type(model), "is_activation_checkpointing", None) or type(model).is_gradient_checkpointing
    if checkpointing.fget(model):  # transformers 5.24 renamed the property; older releases have the old name
        # reentrant activation checkpointing passes no gradient to adapters when no input of a layer requires one
        model.enable_input_require_grads()
    return model


def has_adapters(model) -> bool:
    return model is not None and any(".lora_" in name for name, _ in model.named_parameters())


def lora_scaling(lora) -> float:
    """alpha / r, the factor of B A in every adapted layer."""
    return float(lora.alpha) / lora.rank


def _lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Inside the block `model` computes as its base model: every LoRA layer returns `base_layer(x)`, the exact
    operations of the layer before adapters were added (the KL term's reference policy, with no second copy).

    PEFT's own switch (`disable_adapter_layers`) also flips the adapters' `requires_grad`, which FSDP records when
    it shards; the flag its layers' forward reads is set directly instead.
    """
    layers = _lora_layers(model)
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            layer._disable_adapters = value


def merged_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], scaling: float,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's `(hf_name, tensor)` pairs from an adapted model's state-dict pairs, in their order.

    For every adapted layer, W' = W + (B @ A) * scaling, computed in float32 (the operation order of PEFT's
    `merge_and_unload`, so a float32 model merges to the same bits), under the layer's base name
    (`...q_proj.weight`); other tensors pass through. A layer's tensors are held only until its A and B have
    arrived, so a stream that gathers one tensor at a time (FSDP) holds one layer at a time. `dtype` casts what
    is yielded (e.g. the compute dtype for a rollout engine).
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}

    def out(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        return name, tensor if dtype is None else tensor.to(dtype)

    for name, tensor in named_tensors:
        lora_part, base_part = _LORA_PART.match(name), _BASE_PART.match(name)
        if lora_part is None and base_part is None:
            if ".lora_" not in name:
                yield out(name, tensor)
            continue
        module = (lora_part or base_part)["module"]
        parts = pending.setdefault(module, {})
        parts[lora_part["which"] if lora_part else base_part["param"]] = tensor
        if base_part is not None and base_part["param"] == "bias":
            yield out(f"{module}.bias", tensor)
        if {"weight", "A", "B"} <= parts.keys():
            parts = pending.pop(module)
            base = parts["weight"]
            delta = (parts["B"].float() @ parts["A"].float()) * scaling
            yield out(f"{module}.weight", (base.float() + delta).to(torch.promote_types(base.dtype, torch.float32)))
    if pending:
        raise ValueError(f"merged_weights: adapted layers without base weight, A and B: {sorted(pending)}")


def adapter_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names PEFT's `save_pretrained` writes (`base_model.model.<module>.lora_A.weight`)."""
    return {_PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): tensor.detach().contiguous()
            for name, tensor in named_tensors if _LORA_PART.match(name)}


class AdapterFiles:
    """An adapter directory in PEFT's format, from an adapted model's full state dict (a checkpoint saver)."""

    def __init__(self, lora, base_path: str | None, state: dict[str, torch.Tensor]) -> None:
        self.lora, self.base_path = lora, base_path
        self.weights = adapter_weights(state.items())

    def save_pretrained(self, path: str | Path, **_: Any) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # the adapted modules by name, as PEFT records `all-linear` once resolved (vLLM reads them too)
        targets = sorted({name.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for name in self.weights})
        peft_config(self.lora, self.base_path, targets).save_pretrained(str(path))
        save_file(self.weights, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


class MergedModel:
    """The merged model as a Hugging Face directory, from an adapted model's full state dict (a checkpoint saver):
    `from_pretrained`, vLLM and `tinyrl-eval` load it like a fully trained actor."""

    def __init__(self, model, lora, state: dict[str, torch.Tensor]) -> None:
        self.model = model
        self.weights = dict(merged_weights(state.items(), lora_scaling(lora)))

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        self.model.save_pretrained(path, state_dict=self.weights, **kwargs)


def load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """Set the adapters of `model` (built by `add_adapters` with the same config) to those saved in `adapter_dir`
    (PEFT's format), bit for bit; `model` may be FSDP-sharded. Raises when a saved or expected tensor is missing."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    adapter_dir = Path(adapter_dir)
    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    expected = {name for name, _ in model.named_parameters() if _LORA_PART.match(name)}
    state = {}
    for name in expected:
        key = _PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")
        if key not in saved:
            raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS} has no tensor {key}: saved with another model.lora?")
        state[name] = saved[key]
    if len(saved) != len(expected):
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS} holds {len(saved)} tensors, the model's adapters "
                         f"{len(expected)}: saved with another model.lora?")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

