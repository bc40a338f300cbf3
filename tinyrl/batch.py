"""The rollout batch and its split into micro-batches by token budget.

Layout (as in veRL): each row is `[prompt, left-padded to P | response, right-padded to R]`, so the response of
every row starts at column P and response-level tensors (`response_mask`, log-probs, advantages...) are `[N, R]`.
The logits that predict response token j sit at column P + j - 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [N, P+R]
    attention_mask: torch.Tensor  # [N, P+R]
    response_mask: torch.Tensor  # [N, R] float, 1 on response tokens that enter the loss
    prompt_width: int  # P
    group_index: torch.Tensor  # [N] long: rows with the same value answer the same prompt
    scores: torch.Tensor  # [N] float: the outcome reward of each completion (after any shaping)
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def response_lengths(self) -> torch.Tensor:
        return self.attention_mask[:, self.prompt_width :].sum(-1)

    def prompt_lengths(self) -> torch.Tensor:
        return self.attention_mask[:, : self.prompt_width].sum(-1)

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    def select(self, rows: Sequence[int]) -> "RolloutBatch":
        """The given rows, with padding trimmed to the longest prompt and response among them."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        p = int(self.prompt_lengths()[index].max())
        r = max(int(self.response_lengths()[index].max()), 1)
        cols = slice(self.prompt_width - p, self.prompt_width + r)
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor):
                continue
            value = value[index]
            if f.name in ("input_ids", "attention_mask"):
                value = value[:, cols]
            elif value.dim() == 2:
                value = value[:, :r]
            changes[f.name] = value
        return replace(self, prompt_width=p, **changes)

    def to(self, device) -> "RolloutBatch":
        return replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        )


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    scores: Sequence[float],
    group_index: Sequence[int],
    pad_id: int,
    rollout_logprobs: Sequence[Sequence[float]] | None = None,
    environment_positions: Sequence[Sequence[int]] | None = None,
) -> RolloutBatch:
    """Pack prompts (left-padded) and responses (right-padded) into one `RolloutBatch`; response tokens at
    `environment_positions` (written by the task's environment, not sampled) stay out of the loss."""
    n = len(prompt_ids)
    if not (len(response_ids) == len(scores) == len(group_index) == n):
        raise ValueError("build_batch: prompt_ids, response_ids, scores and group_index must have the same length")
    p = max(len(x) for x in prompt_ids)
    r = max(max((len(x) for x in response_ids), default=1), 1)
    input_ids = torch.full((n, p + r), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, p + r), dtype=torch.long)
    logprobs = torch.zeros((n, r)) if rollout_logprobs is not None else None
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, p - len(prompt) : p] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[i, p - len(prompt) : p] = 1
        if len(response):
            input_ids[i, p : p + len(response)] = torch.as_tensor(response, dtype=torch.long)
            attention_mask[i, p : p + len(response)] = 1
            if logprobs is not None:
                logprobs[i, : len(response)] = torch.as_tensor(rollout_logprobs[i], dtype=torch.float32)
    response_mask = attention_mask[:, p:].float()
    for i, positions in enumerate(environment_positions or ()):
        if len(positions):
            response_mask[i, torch.as_tensor(list(positions), dtype=torch.long)] = 0.0
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        prompt_width=p,
        group_index=torch.as_tensor(list(group_index), dtype=torch.long),
        scores=torch.as_tensor(list(scores), dtype=torch.float32),
        rollout_logprobs=logprobs,
    )


def split_by_tokens(batch: RolloutBatch, rows: Sequence[int], token_budget: int) -> list[list[int]]:
    """Split `rows` into micro-batches whose padded size, rows x (longest prompt + longest response), stays
    within `token_budget` (the padded shape `select` gives them).

    Rows are sorted by length first so that similar lengths share a micro-batch and little is spent on padding;
    a single row longer than the budget gets a micro-batch of its own.
    """
    prompt_lengths = batch.prompt_lengths().tolist()
    response_lengths = batch.response_lengths().tolist()
    order = sorted(rows, key=lambda i: (prompt_lengths[i] + response_lengths[i], response_lengths[i]))
    micro: list[list[int]] = []
    current: list[int] = []
    longest_prompt = longest_response = 0
    for i in order:
        p = max(longest_prompt, prompt_lengths[i])
        r = max(longest_response, response_lengths[i], 1)
        if current and (p + r) * (len(current) + 1) > token_budget:
            micro.append(current)
            current = []
            p, r = prompt_lengths[i], max(response_lengths[i], 1)
        current.append(i)
        longest_prompt, longest_response = p, r
    if current:
        micro.append(current)
    return micro
