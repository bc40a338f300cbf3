"""The rollout engine contract (`RolloutEngine`, with the optional abilities and their defaults) and its data
types."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence

if TYPE_CHECKING:
    import torch


class Feedback(Protocol):
    """The environment's words inside a completion (a calculator, a checker), written between the policy's tokens.

    After the policy samples a token that holds one of the characters in `triggers`, the engine calls
    `feedback(prompt_text, completion_text)`; the text it returns (None: nothing) is tokenized and written as the
    completion's next tokens. Those tokens are the environment's, not the policy's choices: the completion lists
    their positions (`Completion.environment_positions`) and they are kept out of the loss.
    """

    triggers: str

    def __call__(self, prompt: str, text: str) -> str | None: ...


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
    feedback: Feedback | None = None  # the task's environment, if it writes into completions (HFEngine only)


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]  # response tokens, including a final EOS token if one was sampled
    text: str  # decoded response, special tokens removed
    logprobs: list[float] | None  # log-prob of each response token under the sampling distribution
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_new_tokens reached)
    info: dict = field(default_factory=dict)
    environment_positions: list[int] = field(default_factory=list)  # tokens the environment wrote (`Feedback`)


class RolloutEngine:
    """What every rollout engine is: the trainer calls these methods and nothing else.

    An engine must implement `generate`, and either sample from the training model itself
    (`shares_policy_weights = True`, then `update_weights` is how it hears of an update) or `load_weights`. The
    other abilities are optional; the defaults below say what an engine that lacks one does:

    - `shares_policy_weights` (False): it samples from the training model object itself, so the trainer hands it
      that object (`update_weights`) instead of copying weights, gathers the model for it under FSDP, and may use
      its log-probs as pi_old;
    - `environment_feedback` (False): it writes the task's environment text into completions as they are sampled
      (`SamplingConfig.feedback`); a task with an environment is refused with an engine that cannot;
    - `sleep()`: free device memory until the next weight load (does nothing by default);
    - `rebuild(named_tensors)`: start again from these weights after a failed load (by default it cannot, and a
      failed load stops the run; `can_rebuild` says whether an engine overrides it);
    - `submit(prompts, sampling)`: start a generation and return a `PendingGeneration` at once, so the trainer can
      update while the engine samples (`trainer.max_staleness`). Generations and weight loads take effect in the
      order they were called: a submitted batch is sampled by the weights loaded before its `submit`. By default
      `submit` generates before it returns (no overlap, same numbers); `overlaps_generation` says whether an
      engine overrides it;
    - `load_adapter(version, adapter)`: sample from the base weights plus this LoRA adapter from now on
      (`model.lora.weight_sync=adapter`; by default an engine cannot, and the config is refused at start);
    - `close()`: release processes and memory at the end of a run (does nothing by default).

    A new engine is one file with a subclass, plus a row in `tinyrl.rollout.ENGINES` (or `register_engine`, or
    `rollout.engine=path/to/file.py:Class`, which builds `Class(model, tokenizer)`).
    """

    shares_policy_weights: bool = False
    environment_feedback: bool = False

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
        """Return len(prompt_token_ids) * sampling.n completions, grouped by prompt."""
        raise NotImplementedError(f"{type(self).__name__} does not implement generate")

    def update_weights(self, model) -> None:
        """Make the engine sample from the current weights of `model` (a one-process model): by default its
        weights are loaded with `load_weights`."""
        self.load_weights(policy_named_tensors(model))

    def load_weights(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        """Make the engine sample from these weights: full (unsharded) tensors under Hugging Face names,
        `lm_head.weight` included even when tied, consumed one at a time. Engines that sample from the training
        model object itself (`shares_policy_weights = True`) never need it."""
        raise NotImplementedError(f"{type(self).__name__} cannot load weights; it must share the policy's")

    def load_adapter(self, version: int, adapter) -> None:
        """Sample from the engine's base weights plus a LoRA adapter from now on: `adapter` has
        `save_pretrained(directory)`, which writes it in PEFT's format (`tinyrl.lora.AdapterFiles`); `version`
        (1, 2, ...) names it."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve LoRA adapters; use model.lora.weight_sync=merged")

    def sleep(self) -> None:
        """Free device memory until the next weight load (an update runs meanwhile)."""

    def rebuild(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> None:
        """Start again from these weights after a failed `load_weights`."""
        raise NotImplementedError(f"{type(self).__name__} cannot rebuild itself")

    @property
    def can_rebuild(self) -> bool:
        return type(self).rebuild is not RolloutEngine.rebuild

    def submit(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> "PendingGeneration":
        """Start generating with the weights of this moment; `PendingGeneration.result` gives the completions.
        By default the generation runs now, before `submit` returns."""
        return PendingGeneration.finished(self.generate(prompt_token_ids, sampling))

    @property
    def overlaps_generation(self) -> bool:
        return type(self).submit is not RolloutEngine.submit

    def close(self) -> None:
        """Release what the engine holds (processes, device memory)."""


class EngineFailed(RuntimeError):
    """The rollout engine died, hung past `rollout.timeout_s` or reported an error; the run cannot go on (the
    command line prints the message as one line)."""


class PendingGeneration:
    """A generation started by `RolloutEngine.submit`. `result(timeout_s)` waits for its completions (an engine
    that overlaps raises when its worker dies or the wait exceeds `timeout_s`); `engine_idle_s` is how long the
    engine sat idle, waiting for weights or work, before it started this generation (0 when it never waited);
    `weight_loads` how many weight loads the engine had applied when it started it (None: it does not say)."""

    def __init__(self, wait: Callable[[float], list[Completion]]):
        self._wait = wait
        self._completions: list[Completion] | None = None
        self.engine_idle_s = 0.0
        self.weight_loads: int | None = None

    @classmethod
    def finished(cls, completions: list[Completion]) -> "PendingGeneration":
        pending = cls(lambda timeout_s: completions)
        pending._completions = completions
        return pending

    @property
    def done(self) -> bool:
        return self._completions is not None

    def result(self, timeout_s: float) -> list[Completion]:
        if self._completions is None:
            self._completions = self._wait(timeout_s)
        return self._completions


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without touching the caller's random streams: Python's, NumPy's, torch's CPU and CUDA
    generators are saved before and put back after (an in-process vLLM engine reseeds and draws from them)."""
    from tinyrl.checkpoint import capture_rng, restore_rng

    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


def policy_named_tensors(model) -> Iterator[tuple[str, "torch.Tensor"]]:
    """A one-process model's weights as `(hf_name, tensor)` pairs for `load_weights`, `lm_head.weight` included
    when tied (`state_dict` keeps both names of a shared tensor; `named_parameters` and checkpoints drop one)."""
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach()
