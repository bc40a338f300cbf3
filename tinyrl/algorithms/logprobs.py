"""Token log-probs and entropy from logits, computed and differentiated a chunk of tokens at a time."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 256


def _chunks(logits: Tensor, chunk_size: int) -> tuple[bool, list[slice | tuple]]:
    """Indices that cut `logits [..., V]` into 2-D `[rows, V]` views without copying it.

    If the leading dims flatten to a view (contiguous logits), the indices are row slices of `logits.view(-1, V)`;
    otherwise (e.g. `logits[:, :-1]`) they are tuples indexing `logits` itself, one chunk along the token dim.
    """
    vocab = logits.shape[-1]
    try:
        logits.view(-1, vocab)
        flat = True
    except RuntimeError:
        flat = False
    if flat:
        rows = logits.numel() // vocab if vocab else 0
        return True, [slice(start, start + chunk_size) for start in range(0, rows, chunk_size)]
    lead, width = logits.shape[:-2], logits.shape[-2]
    indices: list[slice | tuple] = []
    for outer in itertools.product(*(range(n) for n in lead)):
        for start in range(0, width, chunk_size):
            indices.append((*outer, slice(start, start + chunk_size)))
    return False, indices


def _views(logits: Tensor, others: Sequence[Tensor], flat: bool) -> tuple[Tensor, list[Tensor]]:
    """`logits` as `[N, V]` and `others` (shaped like logits' leading dims) as `[N]` when flat, else unchanged."""
    if not flat:
        return logits, list(others)
    return logits.view(-1, logits.shape[-1]), [o.reshape(-1) for o in others]


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits; float64 logits keep their precision."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _ChunkBuffers:
    """Float buffers of `chunk_size x V`, allocated once per call and reused for every chunk.

    Reuse matters on CPU: a fresh chunk-sized allocation per chunk is returned to the OS when freed and
    page-faulted in again by the next one, which costs more than the arithmetic.
    """

    def __init__(self, logits: Tensor, chunk_size: int, count: int):
        rows = min(chunk_size, max(1, logits.numel() // logits.shape[-1]))
        shape = (rows, logits.shape[-1])
        self.buffers = [torch.empty(shape, dtype=_compute_dtype(logits), device=logits.device) for _ in range(count)]

    def load(self, block: Tensor, temperature: float) -> Tensor:
        """The first buffer, holding z = block / temperature in float."""
        z = self.buffers[0][: block.shape[0]]
        z.copy_(block)
        if temperature != 1.0:
            z.div_(temperature)
        return z

    def spare(self, rows: int) -> Tensor:
        return self.buffers[1][:rows]


def _logsumexp_(z: Tensor) -> Tensor:
    """logsumexp over the last dim, overwriting `z` with exp(z - max)."""
    top = z.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows of -inf stay -inf, not NaN
    z.sub_(top).exp_()
    return z.sum(-1).log_().add_(top.squeeze(-1))


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(y) = z_y - logsumexp(z), z = logits / temperature, computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_size: int, temperature: float) -> Tensor:
        flat, indices = _chunks(logits, chunk_size)
        out = torch.empty(labels.shape, dtype=_compute_dtype(logits), device=logits.device)
        lse = torch.empty_like(out)
        src, (labels_v, out_v, lse_v) = _views(logits, [labels, out, lse], flat)
        buffers = _ChunkBuffers(logits, chunk_size, count=1)
        for idx in indices:
            z = buffers.load(src[idx], temperature)
            picked = z.gather(-1, labels_v[idx].unsqueeze(-1)).squeeze(-1)
            lse_chunk = _logsumexp_(z)
            out_v[idx] = picked - lse_chunk
            lse_v[idx] = lse_chunk
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        flat, indices = _chunks(logits, ctx.chunk_size)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        src, (labels_v, lse_v, grad_v) = _views(logits, [labels, lse, grad_out.contiguous()], flat)
        dst = grad_logits.view(-1, logits.shape[-1]) if flat else grad_logits
        buffers = _ChunkBuffers(logits, ctx.chunk_size, count=1)
        for idx in indices:
            g = grad_v[idx].to(_compute_dtype(logits)).unsqueeze(-1)
            # d log p(y) / dz = onehot(y) - softmax(z)
            block = buffers.load(src[idx], ctx.temperature).sub_(lse_v[idx].unsqueeze(-1)).exp_().mul_(-g)
            block.scatter_add_(-1, labels_v[idx].unsqueeze(-1), g)
            if ctx.temperature != 1.0:
                block.div_(ctx.temperature)
            dst[idx] = block
        return grad_logits, None, None, None


class _ChunkedEntropy(torch.autograd.Function):
    """H = -sum_v p_v log p_v, p = softmax(logits / temperature), computed and differentiated chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int, temperature: float) -> Tensor:
        flat, indices = _chunks(logits, chunk_size)
        out = torch.empty(logits.shape[:-1], dtype=_compute_dtype(logits), device=logits.device)
        lse = torch.empty_like(out)
        src, (out_v, lse_v) = _views(logits, [out, lse], flat)
        buffers = _ChunkBuffers(logits, chunk_size, count=2)
        for idx in indices:
            z = buffers.load(src[idx], temperature)
            top = z.amax(dim=-1, keepdim=True)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            # a -inf logit has p = 0; the clamp makes its p * log p term 0 instead of NaN
            shifted = z.sub_(top).clamp_(min=torch.finfo(z.dtype).min)
            weights = torch.exp(shifted, out=buffers.spare(z.shape[0]))
            total = weights.sum(-1)
            # H = log(sum e^s) - sum(e^s * s) / sum(e^s), with s = z - max
            log_total = total.log()
            out_v[idx] = log_total - weights.mul_(shifted).sum(-1) / total
            lse_v[idx] = log_total + top.squeeze(-1)
        ctx.save_for_backward(logits, lse, out)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, entropy = ctx.saved_tensors
        flat, indices = _chunks(logits, ctx.chunk_size)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        src, (lse_v, ent_v, grad_v) = _views(logits, [lse, entropy, grad_out.contiguous()], flat)
        dst = grad_logits.view(-1, logits.shape[-1]) if flat else grad_logits
        buffers = _ChunkBuffers(logits, ctx.chunk_size, count=2)
        for idx in indices:
            g = grad_v[idx].to(_compute_dtype(logits)).unsqueeze(-1)
            logp = buffers.load(src[idx], ctx.temperature).sub_(lse_v[idx].unsqueeze(-1))
            logp.clamp_(min=torch.finfo(logp.dtype).min)
            probs = torch.exp(logp, out=buffers.spare(logp.shape[0]))
            # dH/dz_v = -p_v * (log p_v + H)
            block = probs.mul_(logp.add_(ent_v[idx].unsqueeze(-1))).mul_(-g)
            if ctx.temperature != 1.0:
                block.div_(ctx.temperature)
            dst[idx] = block
        return grad_logits, None, None


def _check_logits(logits: Tensor, chunk_size: int, temperature: float) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch.Tensor [..., V]")
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         temperature: float = 1.0) -> Tensor:
    """log p(y_t) = z_{t,y_t} - logsumexp_v z_{t,v}, z = logits / temperature; float32 `[...]`, differentiable.

    The token log-likelihood of the policy-gradient theorem (Williams, 1992). `logits` `[..., V]` may be any
    float dtype (bf16 in training); at most `chunk_size` tokens are converted to float32 at a time, in the
    forward and in the backward pass, so no float32 `[B, T, V]` copy ever exists. Non-contiguous logits (such
    as `logits[:, :-1]`) are read in place.
    """
    _check_logits(logits, chunk_size, temperature)
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:-1]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits without V), got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if labels.numel() and bool(((labels < 0) | (labels >= logits.shape[-1])).any()):
        bad = ((labels < 0) | (labels >= logits.shape[-1])).nonzero()[0].tolist()
        raise ValueError(f"labels must be token ids in [0, {logits.shape[-1]}); first bad one at index {bad}")
    return _ChunkedLogprobs.apply(logits, labels.long(), chunk_size, float(temperature))


def entropy_from_logits(logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, temperature: float = 1.0) -> Tensor:
    """H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_{t,v} = -sum_v p_v log p_v, z = logits / temperature.

    Shannon entropy of the token distribution (the entropy bonus of PPO, Schulman et al., 2017), float32
    `[...]`, differentiable, computed `chunk_size` tokens at a time like `logprobs_from_logits`.
    """
    _check_logits(logits, chunk_size, temperature)
    return _ChunkedEntropy.apply(logits, chunk_size, float(temperature))
