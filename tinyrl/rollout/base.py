"""The rollout engine interface and its data types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    n: int = 1  # completions per prompt; a prompt's completions are contiguous in the output
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()  # generation ends after the first of these strings (it is kept in the text)
    seed: int | None = None  # completion j of prompt i is drawn from its own stream seeded by (seed, i, j)
    # Prompt i of this call counts as prompt prompt_offset + i in those seeds, so a share of a larger batch
    # (one rank's prompts) samples exactly what the whole batch would.
    prompt_offset: int = 0


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]  # response tokens, including a final EOS token if one was sampled
    text: str  # decoded response, special tokens removed
    logprobs: list[float] | None  # log-prob of each response token under the sampling distribution
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_new_tokens reached)
    info: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
        """Return len(prompt_token_ids) * sampling.n completions, grouped by prompt."""
        ...

    def update_weights(self, model) -> None:
        """Make the engine sample from the current weights of `model`."""
        ...
