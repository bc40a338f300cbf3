"""Batched forward passes of a Llama-family causal LM over a preallocated KV cache, for sampling on a CPU.

For a tiny model, a decode step through `model(...)` with transformers' growing cache costs far more than its
arithmetic: every step concatenates the whole cache to append one position, rebuilds a 4-D attention mask and runs
through several layers of wrappers. `StaticKVDecoder` keeps keys and values in tensors allocated once for the whole
completion length (`[rows, kv_heads, max_len, head_dim]`, written in place), keeps the padding mask as an additive
bias, and runs the layers' own modules (norms, projections, rotary embedding, MLP) so the numbers are the model's;
only the attention over the cache is written here:

    attn(q, K, V) = softmax(q K^T / sqrt(d) + bias) V      (Vaswani et al., 2017), with K, V shared by the
    num_heads / num_kv_heads query heads of a group (grouped-query attention, Ainslie et al., 2023).

Rotary position embeddings (Su et al., 2021): x' = x * cos + rotate_half(x) * sin, with cos/sin from the model's
own rotary module, so any RoPE scaling the model config asks for applies.

Only models whose layers have exactly this structure are accepted (`StaticKVDecoder.supports`); others go through
the model's own forward (see `tinyrl.rollout.hf`).
"""

from __future__ import annotations

import inspect

import torch

# Model types whose decoder layer is: input norm, attention (q/k/v/o projections, optional per-head q/k norms,
# RoPE), residual, post-attention norm, MLP, residual; a final norm and an LM head.
_LLAMA_FAMILY = ("llama", "qwen2", "qwen3")


def cache_argument(model) -> str:
    """The name of the KV-cache argument of `model.forward` (and of its output field): transformers 5.24 renamed
    `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def distinct_rows(*columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows given by `columns` laid side by side (e.g. prompt ids and their mask): `first`, one row index per
    distinct row (its first occurrence), and `inverse`, for every row the position of its row in `first`; so
    `x[first][inverse]` equals `x` for any tensor `x` whose rows are equal wherever the columns' rows are."""
    _, inverse = torch.unique(torch.cat(columns, dim=1), dim=0, return_inverse=True)
    rows = inverse.shape[0]
    first = torch.full((int(inverse.max()) + 1 if rows else 0,), rows, dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(rows, device=inverse.device), "amin")
    return first, inverse


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dim: the rotation of rotary position embeddings."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class StaticKVDecoder:
    """Prefill and decode steps for `rows` sequences of at most `max_len` tokens (prompt included)."""

    def __init__(self, model, rows: int, max_len: int):
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers)
        first = self.layers[0].self_attn
        self.head_dim = first.head_dim
        self.num_kv_heads = first.k_proj.out_features // self.head_dim
        self.num_heads = first.q_proj.out_features // self.head_dim
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = first.scaling
        weight = model.lm_head.weight
        shape = (rows, self.num_kv_heads, max_len, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        # 0 where a cached position may be attended to, the most negative float on left padding (finite, so that
        # a padding query, whose every key is padding, gets a harmless uniform row instead of NaN): [rows, 1, 1, L]
        self.bias = weight.new_zeros((rows, 1, 1, max_len), dtype=torch.float32)
        self.length = 0  # cache positions written so far (the same for every row: prompts are left-padded)

    @staticmethod
    def supports(model) -> bool:
        """True for a Llama-family causal LM with full attention in every layer (no sliding window)."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in _LLAMA_FAMILY:
            return False
        if getattr(config, "use_sliding_window", False) or getattr(config, "pretraining_tp", 1) != 1:
            return False
        if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
            return False
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        if not layers or not hasattr(model, "lm_head") or not hasattr(body, "rotary_emb"):
            return False
        attn = layers[0].self_attn
        return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run left-padded prompts `[rows, P]`; return the last position's logits `[rows, V]` and the next positions.

        Rows that repeat a prompt (the n completions of one prompt) run it once: the distinct prompts' keys and
        values are computed in the leading cache rows, then copied to every row that continues them.
        """
        width = input_ids.shape[1]
        self.bias[:, 0, 0, :width].masked_fill_(attention_mask == 0, torch.finfo(torch.float32).min)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.full((width, width), float("-inf"), device=input_ids.device).triu(1)
        first, inverse = distinct_rows(input_ids, attention_mask)
        count = first.shape[0]
        if count == input_ids.shape[0]:
            return self._forward(input_ids, positions, self.bias[:, :, :, :width] + causal), positions[:, -1] + 1
        keys, values = self.keys, self.values
        self.keys, self.values = [k[:count] for k in keys], [v[:count] for v in values]  # the leading rows, as scratch
        try:
            logits = self._forward(input_ids[first], positions[first], self.bias[first, :, :, :width] + causal)
            for full, part in zip(keys + values, self.keys + self.values):
                full[:, :, :width] = part[inverse, :, :width]  # the index copies before the write
        finally:
            self.keys, self.values = keys, values
        return logits[inverse], positions[:, -1] + 1

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one token per row (`[rows]`) at `positions` (`[rows]`); return the next logits `[rows, V]`."""
        return self._forward(tokens[:, None], positions[:, None], self.bias[:, :, :, : self.length + 1])

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the cache rows in `index` (in that order), e.g. after some sequences finished."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
        self.bias = self.bias[index]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        rows, width = input_ids.shape
        start, end = self.length, self.length + width
        hidden = self.body.embed_tokens(input_ids)
        cos, sin = self.body.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads: [rows, 1, width, head_dim]
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(rows, width, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(rows, width, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(rows, width, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            keys[:, :, start:end] = k * cos + rotate_half(k) * sin
            values[:, :, start:end] = v
            # group the query heads that share a key/value head: [rows, kv_heads, group * width, head_dim]
            q = q.reshape(rows, self.num_kv_heads, self.group * width, self.head_dim)
            scores = torch.matmul(q, keys[:, :, :end].transpose(-1, -2)) * self.scaling
            scores = scores.view(rows, self.num_kv_heads, self.group, width, end).float()
            probs = torch.softmax(scores + bias[:, :, None], dim=-1).to(values.dtype)
            out = torch.matmul(probs.view(rows, self.num_kv_heads, self.group * width, end), values[:, :, :end])
            out = out.view(rows, self.num_heads, width, self.head_dim).transpose(1, 2).reshape(rows, width, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.length = end
        return self.model.lm_head(self.body.norm(hidden[:, -1]))
