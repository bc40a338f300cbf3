"""Log-prob passes over a micro-batch whose rows share prompts, with no FLOP spent on padding or unread logits.

The n completions of a GRPO group all continue one prompt. `shared_prompt_logits` runs a Llama-family causal LM
(the layers' own norms, projections, rotary embedding and MLP; only the attention is written here) over a flat
stream of tokens: each distinct prompt once, then every row's response tokens except its last (nothing after the
last token is predicted). The linear layers see those T real tokens and nothing else; attention gathers them into
padded blocks, where each response attends to its own prompt's keys and causally to its own earlier tokens:

    attn(q, K, V) = softmax(q K^T / sqrt(d) + mask) V      (Vaswani et al., 2017; grouped-query attention,
                                                           Ainslie et al., 2023)

and the LM head (49,152 x 576 for SmolLM2, a fifth of its parameters) runs only at the positions that predict a
response token: each prompt's last position (for the first response token) and every fed response token.

The numbers are those of the model's own forward over the padded rows, up to float rounding; gradients too (a
prompt's keys and values are gathered for each of its rows, and the gather's backward sums the rows' gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tinyrl.batch import RolloutBatch
from tinyrl.rollout.kv_decode import StaticKVDecoder, distinct_rows, rotate_half


@dataclass
class SharedPromptLayout:
    """A micro-batch as one flat token stream. Flat indices refer to that stream; padded blocks point their padding
    at flat index 0 (read, never used)."""

    token_ids: torch.Tensor  # [T] each distinct prompt once, then every row's response tokens but its last
    positions: torch.Tensor  # [T] position ids: 0.. in a prompt, prompt length + j at response token j
    prompt_index: torch.Tensor  # [U, Pw] flat index of distinct prompt u's token t (right-padded)
    prompt_lengths: torch.Tensor  # [U]
    response_index: torch.Tensor  # [n, Rw] flat index of row i's fed response token j (right-padded)
    response_lengths: torch.Tensor  # [n] fed response tokens of each row
    row_prompt: torch.Tensor  # [n] the distinct prompt row i continues
    predict: torch.Tensor  # [K] flat position that predicts each response token, in `dest` order
    targets: torch.Tensor  # [K] the response token predicted there
    dest: torch.Tensor  # [K] flat index into the micro-batch's [n, R] response layout
    shape: tuple[int, int]  # (n, R)

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """`[K]` values (in `dest` order) to the `[n, R]` response layout, zero elsewhere; differentiable."""
        n, r = self.shape
        return per_token.new_zeros(n * r).index_copy(0, self.dest, per_token).view(n, r)


def shared_prompt_layout(mb: RolloutBatch) -> Optional[SharedPromptLayout]:
    """The flat layout of `mb`, or None when no prompt repeats (nothing to share) or a row with a response has an
    empty prompt (no position would predict its first token)."""
    p_width = mb.prompt_width
    prompt_ids, prompt_mask = mb.input_ids[:, :p_width], mb.attention_mask[:, :p_width]
    first, inverse = distinct_rows(prompt_ids, prompt_mask)
    n, u = prompt_ids.shape[0], first.shape[0]
    if u == n:
        return None
    prompt_lengths = prompt_mask[first].sum(-1)
    response_lengths = mb.response_lengths()
    if bool(((prompt_lengths[inverse] == 0) & (response_lengths > 0)).any()):
        return None
    device = mb.input_ids.device
    fed = (response_lengths - 1).clamp(min=0)

    # prompts are left-padded in the batch: distinct prompt u's token t sits at column P - p_u + t
    p_w = max(int(prompt_lengths.max()), 1)
    t = torch.arange(p_w, device=device)
    prompt_valid = t < prompt_lengths[:, None]  # [U, Pw]
    prompt_tokens = prompt_ids[first].gather(1, (p_width - prompt_lengths[:, None] + t).clamp(max=p_width - 1))
    prompt_starts = prompt_lengths.cumsum(0) - prompt_lengths
    prompt_index = torch.where(prompt_valid, prompt_starts[:, None] + t, 0)

    r_w = max(int(fed.max()), 1)
    j = torch.arange(r_w, device=device)
    response_valid = j < fed[:, None]  # [n, Rw]
    response_tokens = mb.input_ids[:, p_width : p_width + r_w]  # r_w <= R: a row feeds all but its last token
    total_prompt = int(prompt_lengths.sum())
    response_starts = total_prompt + fed.cumsum(0) - fed
    response_index = torch.where(response_valid, response_starts[:, None] + j, 0)

    token_ids = torch.cat([prompt_tokens[prompt_valid], response_tokens[response_valid]])
    row_lengths = prompt_lengths[inverse]
    positions = torch.cat([t.expand_as(prompt_valid)[prompt_valid], (row_lengths[:, None] + j)[response_valid]])

    # response token 0 of row i is predicted by its prompt's last position, token j >= 1 by fed token j - 1
    r = mb.response_width
    has_response = response_lengths > 0
    prompt_last = prompt_starts[inverse] + row_lengths - 1  # [n]
    predict_rows = torch.cat([prompt_last[:, None], response_index], dim=1)[:, :r]  # [n, min(R, Rw + 1)]
    width = predict_rows.shape[1]
    keep = torch.arange(width, device=device) < response_lengths[:, None]  # [n, width]
    keep &= has_response[:, None]
    dest = (torch.arange(n, device=device)[:, None] * r + torch.arange(width, device=device))[keep]
    return SharedPromptLayout(
        token_ids=token_ids, positions=positions, prompt_index=prompt_index, prompt_lengths=prompt_lengths,
        response_index=response_index, response_lengths=fed, row_prompt=inverse, predict=predict_rows[keep],
        targets=mb.responses()[:, :width][keep], dest=dest, shape=(n, r),
    )


def supports(model) -> bool:
    """Whether `shared_prompt_logits` computes `model`'s numbers: a Llama-family model with full attention in every
    layer (see `StaticKVDecoder.supports`), and in training neither attention dropout nor activation checkpointing
    (both of which this forward would silently leave out)."""
    if not StaticKVDecoder.supports(model):
        return False
    if not model.training:
        return True
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.24; earlier name below
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return not (checkpointing or getattr(model.config, "attention_dropout", 0.0))


def shared_prompt_logits(model, layout: SharedPromptLayout) -> torch.Tensor:
    """Logits `[K, V]` at `layout.predict` (the positions that predict response tokens, in `dest` order)."""
    body = model.model
    first = body.layers[0].self_attn
    head_dim = first.head_dim
    num_heads, num_kv_heads = first.q_proj.out_features // head_dim, first.k_proj.out_features // head_dim
    u, p_w = layout.prompt_index.shape
    n, r_w = layout.response_index.shape
    device = layout.token_ids.device

    hidden = body.embed_tokens(layout.token_ids)  # [T, D]
    cos, sin = body.rotary_emb(hidden[None], layout.positions[None])
    cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, d]: broadcast over heads

    # masks: a response sees its prompt's real tokens and its own tokens up to itself; prompts are causal
    prompt_keys = torch.arange(p_w, device=device) < layout.prompt_lengths[layout.row_prompt][:, None]  # [n, Pw]
    causal = torch.ones(r_w, r_w, dtype=torch.bool, device=device).tril()
    response_mask = torch.cat([prompt_keys[:, None, :].expand(n, r_w, p_w), causal.expand(n, r_w, r_w)], dim=-1)
    response_mask = response_mask[:, None]  # [n, 1, Rw, Pw + Rw]
    prompt_flat, response_flat = layout.prompt_index.reshape(-1), layout.response_index.reshape(-1)
    prompt_valid = (torch.arange(p_w, device=device) < layout.prompt_lengths[:, None]).reshape(-1)
    response_valid = (torch.arange(r_w, device=device) < layout.response_lengths[:, None]).reshape(-1)
    # padded block positions back to the flat stream (in flat order: prompts, then responses)
    unpad = torch.cat([prompt_valid.nonzero().squeeze(-1), u * p_w + response_valid.nonzero().squeeze(-1)])

    def blocks(x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat `[T, heads * d]` to padded prompt `[U, heads, Pw, d]` and response `[n, heads, Rw, d]` blocks."""
        x = x.view(-1, heads, head_dim)
        prompts = x.index_select(0, prompt_flat).view(u, p_w, heads, head_dim).transpose(1, 2)
        responses = x.index_select(0, response_flat).view(n, r_w, heads, head_dim).transpose(1, 2)
        return prompts, responses

    for layer in body.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(-1, num_heads, head_dim)
        k = attn.k_proj(x).view(-1, num_kv_heads, head_dim)
        v = attn.v_proj(x)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        (qp, qr), (kp, kr), (vp, vr) = blocks(q, num_heads), blocks(k, num_kv_heads), blocks(v, num_kv_heads)
        # index_select, not x[index]: its backward (index_add_) sums a prompt's rows in a fixed order on the CPU
        keys = torch.cat([kp.index_select(0, layout.row_prompt), kr], dim=2)
        values = torch.cat([vp.index_select(0, layout.row_prompt), vr], dim=2)
        out_prompts = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=attn.scaling, enable_gqa=True)
        out_responses = F.scaled_dot_product_attention(qr, keys, values, attn_mask=response_mask, scale=attn.scaling,
                                                       enable_gqa=True)
        out = torch.cat([out_prompts.transpose(1, 2).reshape(u * p_w, -1),
                         out_responses.transpose(1, 2).reshape(n * r_w, -1)]).index_select(0, unpad)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(body.norm(hidden.index_select(0, layout.predict)))
