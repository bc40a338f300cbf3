"""Forward passes of policy, reference and critic over a `RolloutBatch`, micro-batch by micro-batch."""

from __future__ import annotations

import contextlib

import torch

from tinyrl import algorithms
from tinyrl.batch import RolloutBatch, split_by_tokens


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


def token_logprobs(model, mb: RolloutBatch, temperature: float, with_entropy: bool = False):
    """Per-token log-probs `[n, R]` of the response under `model` at the sampling temperature (and entropy)."""
    logits = response_logits(model, mb)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = algorithms.logprobs_from_logits(logits, mb.responses())
    entropy = algorithms.entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def token_values(critic, mb: RolloutBatch) -> torch.Tensor:
    """Critic values `[n, R]`: V(prefix up to and including the token before response token j)."""
    p, r = mb.prompt_width, mb.response_width
    out = critic(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids())
    return out.logits[:, p - 1 : p + r - 1, 0].float()


@torch.no_grad()
def batched_logprobs(model, batch: RolloutBatch, token_budget: int, temperature: float, device, dtype) -> torch.Tensor:
    """Log-probs of every response token in `batch` (no gradient), on the CPU, `[N, R]`."""
    result = torch.zeros(batch.size, batch.response_width)
    for rows in split_by_tokens(batch, range(batch.size), token_budget):
        mb = batch.select(rows).to(device)
        with autocast_for(device, dtype):
            logprobs, _ = token_logprobs(model, mb, temperature)
        result[rows, : mb.response_width] = logprobs.float().cpu()
    return result


@torch.no_grad()
def batched_values(critic, batch: RolloutBatch, token_budget: int, device, dtype) -> torch.Tensor:
    result = torch.zeros(batch.size, batch.response_width)
    for rows in split_by_tokens(batch, range(batch.size), token_budget):
        mb = batch.select(rows).to(device)
        with autocast_for(device, dtype):
            values = token_values(critic, mb)
        result[rows, : mb.response_width] = values.float().cpu()
    return result
