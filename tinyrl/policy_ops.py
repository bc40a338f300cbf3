"""Forward passes of policy, reference and critic over a `RolloutBatch`, micro-batch by micro-batch.

Each pass takes `packing=None` (padded rows, `RolloutBatch` layout) or a `Packing` from `plan_micro_batches`
(sequences end to end, see `tinyrl.packing`); both return the same `[n, R]` response layout. Padded log-prob
passes may also run each distinct prompt once for all the rows that share it, and the responses without padding
(`share_prompts`, see `tinyrl.prompt_sharing`): the completions of a GRPO group all continue one prompt.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from tinyrl import algorithms, prompt_sharing
from tinyrl.batch import RolloutBatch
from tinyrl.packing import Packing, pack_layout, plan_micro_batches
from tinyrl.prompt_sharing import shared_prompt_layout, shared_prompt_logits


def autocast_for(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on GPU when the model is kept in float32; nothing on CPU."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def response_logits(model, mb: RolloutBatch) -> torch.Tensor:
    """Logits `[n, R, V]` that predict each response token (column P + j - 1 predicts response token j)."""
    r = mb.response_width
    out = model(
        input_ids=mb.input_ids,
        attention_mask=mb.attention_mask,
        position_ids=mb.position_ids(),
        logits_to_keep=r + 1,
        use_cache=False,
    )
    return out.logits[:, :-1, :]


def token_logprobs(model, mb: RolloutBatch, temperature: float, with_entropy: bool = False,
                   packing: Optional[Packing] = None, share_prompts: bool = False):
    """Per-token log-probs `[n, R]` of the response under `model` at the sampling temperature (and entropy).

    `share_prompts` (padded rows only): when some prompt repeats and the model allows it, each distinct prompt runs
    once and the responses without padding (`tinyrl.prompt_sharing`); otherwise the plain padded pass. The number of
    forward calls then depends on the rows, so a sharded model (where each call is a collective) must not ask for it.
    """
    if packing is not None:
        layout = pack_layout(mb, packing)
        logits = _packed_logits(model, layout, packing)
        logprobs, entropy = _logprobs_and_entropy(logits, layout.targets, temperature, with_entropy)
        return layout.unpack(logprobs), (layout.unpack(entropy) if entropy is not None else None)
    shared = shared_prompt_layout(mb) if share_prompts and prompt_sharing.supports(model) else None
    if shared is not None:
        logits = shared_prompt_logits(model, shared)
        logprobs, entropy = _logprobs_and_entropy(logits, shared.targets, temperature, with_entropy)
        return shared.unpack(logprobs), (shared.unpack(entropy) if entropy is not None else None)
    logits = response_logits(model, mb)
    return _logprobs_and_entropy(logits, mb.responses(), temperature, with_entropy)


def _packed_logits(model, layout, packing: Packing) -> torch.Tensor:
    """Logits `[K, V]` of the positions that predict response tokens, in `layout.dest` order; the LM head runs on
    those positions only (by a boolean mask over the rows where transformers takes one, else on the columns any
    row needs, which for several rows also covers prompt positions)."""
    rows = layout.input_ids.shape[0]
    if rows > 1 and slices_logits_by_mask():
        logits = model(**layout.model_inputs(packing), logits_to_keep=layout.keep_mask()).logits
        if logits.shape[:-1] != layout.targets.shape:
            raise RuntimeError(f"the model ignored the boolean logits_to_keep: logits {tuple(logits.shape)}")
        return logits
    logits = model(**layout.model_inputs(packing), logits_to_keep=layout.keep_columns).logits
    return logits[0] if rows == 1 else logits[layout.keep_rows, layout.keep_ranks]


@functools.cache
def slices_logits_by_mask() -> bool:
    """Whether this transformers slices hidden states by a 2D boolean `logits_to_keep` (newer 5.x releases;
    earlier ones index the sequence dimension with it, which a mask cannot do)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    try:
        kept = slice_logits_to_keep(torch.zeros(2, 2, 1), torch.tensor([[True, False], [True, True]]))
    except Exception:
        return False
    return tuple(kept.shape) == (3, 1)


def _logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool):
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = algorithms.logprobs_from_logits(logits, labels)
    entropy = algorithms.entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def token_values(critic, mb: RolloutBatch, packing: Optional[Packing] = None) -> torch.Tensor:
    """Critic values `[n, R]`: V(prefix up to and including the token before response token j)."""
    if packing is not None:
        layout = pack_layout(mb, packing)
        values = critic(**layout.model_inputs(packing)).logits[..., 0].reshape(-1)
        return layout.unpack(values[layout.keep_flat].float())
    p, r = mb.prompt_width, mb.response_width
    out = critic(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids())
    return out.logits[:, p - 1 : p + r - 1, 0].float()


@torch.no_grad()
def batched_logprobs(model, batch: RolloutBatch, token_budget: int, temperature: float, device, dtype,
                     layout: Optional[str] = None, share_prompts: bool = False) -> torch.Tensor:
    """Log-probs of every response token in `batch` (no gradient), on the CPU, `[N, R]`."""
    result = torch.zeros(batch.size, batch.response_width)
    micro, packing = plan_micro_batches(batch, range(batch.size), token_budget, layout)
    for rows in micro:
        mb = batch.select(rows).to(device)
        with autocast_for(device, dtype):
            logprobs, _ = token_logprobs(model, mb, temperature, packing=packing, share_prompts=share_prompts)
        result[rows, : mb.response_width] = logprobs.float().cpu()
    return result


@torch.no_grad()
def batched_values(critic, batch: RolloutBatch, token_budget: int, device, dtype,
                   layout: Optional[str] = None) -> torch.Tensor:
    result = torch.zeros(batch.size, batch.response_width)
    micro, packing = plan_micro_batches(batch, range(batch.size), token_budget, layout)
    for rows in micro:
        mb = batch.select(rows).to(device)
        with autocast_for(device, dtype):
            values = token_values(critic, mb, packing=packing)
        result[rows, : mb.response_width] = values.float().cpu()
    return result
