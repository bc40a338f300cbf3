"""Sequence packing: the sequences of a micro-batch laid end to end in rows, so no FLOP is spent on padding.

A packed row holds several sequences (prompt, then response without its last token: nothing after the last token
is predicted) one after another. `position_ids` restart at 0 at every sequence, which is how transformers keeps the
sequences apart: flash-attention's varlen kernel takes the boundaries (`cu_seq_lens_*`, given explicitly here), and
sdpa, eager and flex_attention build a block-diagonal causal mask from the restarting positions (transformers'
`masking_utils`). A row of a dense-mask kernel (sdpa, eager) costs row_width^2 in attention, so those rows are kept
no wider than the longest sequence; a block-sparse or varlen kernel (flex_attention, flash-attention) takes the
whole micro-batch as one row.

Log-probs, entropies and values come back in the batch's `[n, R]` response layout (zero where a row has no
response token), so every loss and every normalisation downstream is the one of the padded path.

Micro-batches are planned by first-fit decreasing: sequences, longest first, each go into the first row with room
(capacity `row_tokens`), and consecutive rows are grouped while the micro-batch stays within the token budget. A
micro-batch lists its rows row by row, so laying its sequences out again in that order, starting a new row whenever
the next sequence does not fit (`pack_layout`), gives back exactly those rows: the first sequence of a row did not
fit in any earlier row when it was placed, and earlier rows only grew afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from tinyrl.batch import RolloutBatch, split_by_tokens

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
ONE_ROW_ATTENTION = FLASH_ATTENTION + ("flex_attention",)  # cost grows with the real tokens only
DENSE_MASK_ATTENTION = ("sdpa", "eager")  # cost grows with row_width^2 whatever the mask


@dataclass(frozen=True)
class Packing:
    """How the sequences of a micro-batch are laid out: in rows of at most `row_tokens` tokens (a sequence longer
    than that gets a row of its own), or all in one row when `row_tokens` is None; `flash` adds the explicit
    varlen boundaries flash-attention reads."""

    row_tokens: Optional[int] = None
    flash: bool = False


@dataclass
class PackedLayout:
    """One micro-batch, packed. Flat indices refer to `input_ids.view(-1)` and to the `[n, R]` response layout."""

    input_ids: torch.Tensor  # [B, W] token ids (tail padding of a row is token 0, a sequence of its own)
    position_ids: torch.Tensor  # [B, W] restarting at 0 at every sequence
    keep_columns: torch.Tensor  # [C] sorted columns holding at least one position that predicts a response token
    keep_rows: torch.Tensor  # [K] row of each predicting position, in the order of `dest`
    keep_ranks: torch.Tensor  # [K] index into keep_columns of each predicting position
    keep_flat: torch.Tensor  # [K] flat position in [B * W] of each predicting position
    targets: torch.Tensor  # [K] the response token each position predicts
    dest: torch.Tensor  # [K] flat index into the [n, R] response layout
    shape: tuple[int, int]  # (n, R) of the micro-batch
    cu_seq_lens: torch.Tensor  # [S + 1] int32 sequence boundaries in the flattened rows (flash-attention varlen)
    max_length: int  # longest packed sequence

    @property
    def tokens(self) -> int:
        """Tokens fed to the model, tail padding included."""
        return self.input_ids.numel()

    def model_inputs(self, packing: Packing) -> dict:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if packing.flash:
            inputs.update(
                cu_seq_lens_q=self.cu_seq_lens, cu_seq_lens_k=self.cu_seq_lens,
                max_length_q=self.max_length, max_length_k=self.max_length,
            )
        return inputs

    def keep_mask(self) -> torch.Tensor:
        """`[B, W]` True at the positions that predict a response token (row-major order is `dest` order)."""
        mask = torch.zeros(self.input_ids.numel(), dtype=torch.bool, device=self.input_ids.device)
        return mask.index_fill_(0, self.keep_flat, True).view_as(self.input_ids)

    def unpack(self, per_token: torch.Tensor) -> torch.Tensor:
        """`[K]` values (in `dest` order) to the `[n, R]` response layout, zero elsewhere; differentiable."""
        n, r = self.shape
        return per_token.new_zeros(n * r).index_copy(0, self.dest, per_token).view(n, r)


def packed_lengths(batch: RolloutBatch) -> list[int]:
    """Tokens each row feeds when packed: its prompt and all but the last response token (0 without a response)."""
    prompt = batch.prompt_lengths().tolist()
    response = batch.response_lengths().tolist()
    return [p + r - 1 if r > 0 else 0 for p, r in zip(prompt, response)]


def packing_for(models: Sequence) -> str:
    """The packed layout the models' attention kernels need together: "flash" (one row with explicit varlen
    boundaries, every model on flash-attention), "one_row" (flash-attention and flex_attention mixed, or flex
    alone) or "dense" (rows no wider than the longest sequence, as soon as one model uses sdpa or eager).

    Raises a ValueError naming the attention implementation when packing cannot keep sequences apart with it.
    """
    kinds = set()
    for model in models:
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation in ONE_ROW_ATTENTION:
            kinds.add("flash" if implementation in FLASH_ATTENTION else "one_row")
        elif implementation in DENSE_MASK_ATTENTION:
            kinds.add("dense")
        else:
            raise ValueError(
                f"trainer.packing: attention implementation {implementation!r} of {type(model).__name__} cannot "
                f"keep packed sequences apart; use model.attn_implementation in "
                f"{DENSE_MASK_ATTENTION + ONE_ROW_ATTENTION} or trainer.packing=false"
            )
    if "dense" in kinds:
        return "dense"
    return "flash" if kinds == {"flash"} else "one_row"


def layout_for(setting: str | bool, models: Sequence) -> Optional[str]:
    """The layout `trainer.packing` asks for with these models: None (padded) for false, and for auto unless every
    model's attention kernel costs only the real tokens (flash-attention, flex_attention); otherwise the kind
    `packing_for` names (true refuses a kernel that cannot keep packed sequences apart)."""
    setting = str(setting).lower()
    if setting == "false":
        return None
    if setting == "auto":
        kernels = {getattr(m.config, "_attn_implementation", None) for m in models}
        return packing_for(models) if kernels <= set(ONE_ROW_ATTENTION) else None
    if setting != "true":
        raise ValueError(f"trainer.packing must be auto, true or false, got {setting!r}")
    return packing_for(models)


def plan_micro_batches(
    batch: RolloutBatch, rows: Sequence[int], token_budget: int, layout: Optional[str]
) -> tuple[list[list[int]], Optional[Packing]]:
    """Micro-batches of `rows` within `token_budget` tokens each, and how to lay them out.

    `layout` None gives padded micro-batches (`split_by_tokens`, packing None). "dense" packs into rows no
    wider than the longest sequence (nor the budget); "one_row" and "flash" put each micro-batch in one row.
    Every row appears in exactly one micro-batch; rows without a response token (which feed nothing) ride along
    in the last one. A sequence longer than the budget gets a micro-batch of its own.
    """
    if layout is None:
        return split_by_tokens(batch, rows, token_budget), None
    if layout not in ("dense", "one_row", "flash"):
        raise ValueError(f"layout must be None, 'dense', 'one_row' or 'flash', got {layout!r}")
    lengths = packed_lengths(batch)
    fed = [i for i in rows if lengths[i] > 0]
    empty = [i for i in rows if lengths[i] == 0]
    longest = max((lengths[i] for i in fed), default=1)
    capacity = min(token_budget, longest) if layout == "dense" else token_budget
    packed_rows = first_fit_decreasing(fed, [lengths[i] for i in fed], capacity)
    micro: list[list[int]] = []
    width = count = 0
    for packed_row in packed_rows:
        fill = sum(lengths[i] for i in packed_row)
        if layout == "dense":
            new_width = max(width, fill)
            fits = (count + 1) * new_width <= token_budget
        else:
            new_width, fits = width + fill, width + fill <= token_budget
        if micro and fits:
            micro[-1].extend(packed_row)
            width, count = new_width, count + 1
        else:
            micro.append(list(packed_row))
            width, count = fill, 1
    if empty:
        if micro:
            micro[-1].extend(empty)
        else:
            micro.append(empty)
    return micro, Packing(row_tokens=capacity if layout == "dense" else None, flash=layout == "flash")


def first_fit_decreasing(items: Sequence[int], sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of `items`, each summing to at most `capacity` (an item larger than that fills a bin alone), in the
    order they were opened; items are placed longest first (ties by position), each in the first bin with room."""
    order = sorted(range(len(items)), key=lambda k: (-sizes[k], k))
    bins: list[list[int]] = []
    fills: list[int] = []
    for k in order:
        for b, fill in enumerate(fills):
            if fill + sizes[k] <= capacity:
                bins[b].append(items[k])
                fills[b] += sizes[k]
                break
        else:
            bins.append([items[k]])
            fills.append(sizes[k])
    return bins


def pack_layout(mb: RolloutBatch, packing: Packing) -> PackedLayout:
    """Lay the rows of `mb` end to end, in their order, on `mb`'s device (see `Packing`)."""
    n, width = mb.input_ids.shape
    p_width, r_width = mb.prompt_width, mb.response_width
    prompt_lengths = mb.prompt_lengths().tolist()
    response_lengths = mb.response_lengths().tolist()
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        if p == 0 and r > 0:
            raise ValueError(f"row {i} has an empty prompt: packing needs a token before the first response token")

    # rows of sequences, laid out in the given order (next-fit)
    packed_rows: list[list[int]] = []
    fill = 0
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        length = p + r - 1 if r > 0 else 0
        if length == 0:
            continue
        if not packed_rows or (packing.row_tokens is not None and fill + length > packing.row_tokens):
            packed_rows.append([])
            fill = 0
        packed_rows[-1].append(i)
        fill += length
    if not packed_rows:  # nothing to predict: feed one prompt token so the pass (and its backward) still runs
        packed_rows = [[-1]]

    row_fills = [sum(prompt_lengths[i] + response_lengths[i] - 1 for i in row if i >= 0) or 1 for row in packed_rows]
    row_width = max(row_fills)
    source, positions, keep_flat, dest, seq_lens = [], [], [], [], []
    for b, (row, row_fill) in enumerate(zip(packed_rows, row_fills)):
        offset = b * row_width
        for i in row:
            if i < 0:
                source.append(torch.zeros(1, dtype=torch.long))
                positions.append(torch.zeros(1, dtype=torch.long))
                seq_lens.append(1)
                offset += 1
                continue
            p, r = prompt_lengths[i], response_lengths[i]
            length = p + r - 1
            source.append(i * width + torch.arange(p_width - p, p_width + r - 1))
            positions.append(torch.arange(length))
            keep_flat.append(offset + torch.arange(p - 1, length))  # position p-1+j predicts response token j
            dest.append(i * r_width + torch.arange(r))
            seq_lens.append(length)
            offset += length
        if row_fill < row_width:  # tail padding: a sequence of its own, never read
            source.append(torch.full((row_width - row_fill,), -1, dtype=torch.long))
            positions.append(torch.arange(row_width - row_fill))
            seq_lens.append(row_width - row_fill)

    source = torch.cat(source).to(mb.input_ids.device)
    flat_ids = mb.input_ids.reshape(-1)
    input_ids = torch.where(source >= 0, flat_ids[source.clamp(min=0)], torch.zeros_like(source))
    device = mb.input_ids.device
    keep_flat_t = torch.cat(keep_flat) if keep_flat else torch.zeros(0, dtype=torch.long)
    dest_t = torch.cat(dest) if dest else torch.zeros(0, dtype=torch.long)
    keep_columns, keep_ranks = torch.unique(keep_flat_t % row_width, sorted=True, return_inverse=True)
    targets = mb.responses().reshape(-1)[dest_t.to(device)] if dest else torch.zeros(0, dtype=torch.long, device=device)
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
    return PackedLayout(
        input_ids=input_ids.view(len(packed_rows), row_width),
        position_ids=torch.cat(positions).to(device).view(len(packed_rows), row_width),
        keep_columns=keep_columns.to(device),
        keep_rows=(keep_flat_t // row_width).to(device),
        keep_ranks=keep_ranks.to(device),
        keep_flat=keep_flat_t.to(device),
        targets=targets,
        dest=dest_t.to(device),
        shape=(n, r_width),
        cu_seq_lens=cu.to(device),
        max_length=max(seq_lens),
    )
