"""Loss aggregation modes (token-mean, seq-mean-token-mean, ...) and the mini-batch divisor under accumulation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ._common import _as_mask, _check_shape, _lookup, _zero_outside

AGG_MODES: dict[str, Callable[..., Tensor]] = {}


@dataclass(frozen=True)
class LossNormalizer:
    """The divisor of a whole mini-batch's loss for one aggregation `mode`; see `loss_normalizer`."""

    mode: str
    value: float


def _token_count(mask: Tensor) -> float:
    return float(mask.sum())


def _sequence_count(mask: Tensor) -> float:
    return float(mask.any(-1).sum())


Normalizer = LossNormalizer | float | Tensor | None


def _resolve_divisor(mode: str, normalizer: Normalizer, default: Callable[[], float | Tensor]) -> float | Tensor:
    if normalizer is None:
        return default()
    if isinstance(normalizer, LossNormalizer):
        if normalizer.mode != mode:
            raise ValueError(f"normalizer was computed for aggregation mode {normalizer.mode!r}, not {mode!r}")
        value: float | Tensor = normalizer.value
    else:
        value = normalizer
    as_float = float(value)
    if not math.isfinite(as_float) or as_float < 0:
        raise ValueError(f"normalizer must be a finite number >= 0, got {as_float}")
    return value


def _divide(numerator: Tensor, divisor: float | Tensor) -> Tensor:
    """numerator / divisor, and 0 (still attached to the graph) when the divisor is 0 (nothing to average)."""
    if float(divisor) == 0:
        return numerator * 0.0
    return numerator / divisor


def _agg_token_mean(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """token-mean: L = sum_{i,t} m_it * l_it / N; N = sum_{i,t} m_it over the whole mini-batch.

    Token-level normalisation of DAPO (Yu et al., 2025) and of PPO for LLMs.
    """
    divisor = _resolve_divisor("token-mean", normalizer, lambda: _token_count(response_mask))
    return _divide(_zero_outside(loss_mat, response_mask).sum(), divisor)


def _agg_seq_mean_token_mean(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """seq-mean-token-mean: L = 1/S * sum_i (sum_t m_it * l_it / |o_i|); S = sequences with >= 1 response token.

    The GRPO objective of Shao et al., 2024 ("DeepSeekMath"), eq. 3.
    """
    divisor = _resolve_divisor("seq-mean-token-mean", normalizer, lambda: _sequence_count(response_mask))
    per_sequence = _zero_outside(loss_mat, response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)
    return _divide(per_sequence.sum(), divisor)


def _agg_seq_mean_token_sum(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """seq-mean-token-sum: L = 1/S * sum_i sum_t m_it * l_it; S = sequences with >= 1 response token.

    Sequence-level REINFORCE objective (Williams, 1992; RLOO, Ahmadian et al., 2024).
    """
    divisor = _resolve_divisor("seq-mean-token-sum", normalizer, lambda: _sequence_count(response_mask))
    return _divide(_zero_outside(loss_mat, response_mask).sum(), divisor)


def _agg_seq_mean_token_sum_norm(loss_mat: Tensor, response_mask: Tensor, normalizer: Normalizer = None) -> Tensor:
    """seq-mean-token-sum-norm: L = 1/S * sum_i (sum_t m_it * l_it / C); C a constant, default the padded length T.

    Liu et al., 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO): no 1/|o_i| length bias. The mean
    over sequences keeps the loss scale independent of how many sequences a micro-batch holds.
    """
    divisor = _resolve_divisor("seq-mean-token-sum-norm", normalizer,
                               lambda: _sequence_count(response_mask) * response_mask.shape[-1])
    return _divide(_zero_outside(loss_mat, response_mask).sum(), divisor)


AGG_MODES.update({
    "token-mean": _agg_token_mean,
    "seq-mean-token-mean": _agg_seq_mean_token_mean,
    "seq-mean-token-sum": _agg_seq_mean_token_sum,
    "seq-mean-token-sum-norm": _agg_seq_mean_token_sum_norm,
})


def aggregate(loss_mat: Tensor, response_mask: Tensor, mode: str,
              normalizer: Normalizer = None) -> Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar: L = sum(numerator_mode(l, m)) / divisor (see `AGG_MODES`).

    Modes: `token-mean`, `seq-mean-token-mean` (GRPO, DeepSeekMath), `seq-mean-token-sum`,
    `seq-mean-token-sum-norm` (Dr. GRPO). `normalizer` is the divisor of the WHOLE mini-batch, normally the
    `LossNormalizer` returned by `loss_normalizer` (a plain number is taken as the divisor itself); None uses
    this tensor alone. Positions outside the mask never contribute; a divisor of 0 gives a loss of 0.
    """
    fn = _lookup(AGG_MODES, mode, "aggregation mode")
    mask = _as_mask(response_mask)
    _check_shape("loss_mat", loss_mat, mask.shape)
    return fn(loss_mat, mask, normalizer)


def loss_normalizer(mode: str, response_masks: Sequence[Tensor], constant: float | None = None) -> LossNormalizer:
    """The divisor of the whole mini-batch loss, from the response masks of ALL its micro-batches.

    token-mean: N = sum of every mask; seq-mean-token-mean and seq-mean-token-sum: S = sequences with a
    response token; seq-mean-token-sum-norm: S * C, C = `constant` (Dr. GRPO uses the maximum response
    length of the run; it defaults to the widest micro-batch, i.e. the whole mini-batch's padded length).

    Usage under gradient accumulation (micro-batches may have different padded lengths)::

        norm = loss_normalizer(agg, [mb.response_mask for mb in micro_batches], constant=max_response_tokens)
        for mb in micro_batches:
            loss, metrics = policy_loss(kind, ..., mb.response_mask, agg=agg, normalizer=norm)
            loss.backward()          # do NOT divide by the number of micro-batches
        optimizer.step()

    Summed, the micro-batch losses equal `aggregate` over the whole mini-batch (with the same `constant`),
    and so do their gradients. Under data parallelism, where gradients are averaged over ranks, compute the
    normalizer over the masks of all ranks and scale each rank's loss by the number of ranks.
    """
    _lookup(AGG_MODES, mode, "aggregation mode")
    masks = [_as_mask(m, f"response_masks[{i}]") for i, m in enumerate(response_masks)]
    if not masks:
        raise ValueError("response_masks is empty: pass the response mask of every micro-batch")
    if mode == "token-mean":
        return LossNormalizer(mode, sum(_token_count(m) for m in masks))
    sequences = sum(_sequence_count(m) for m in masks)
    if mode == "seq-mean-token-sum-norm":
        if constant is None:
            constant = max(m.shape[-1] for m in masks)
        if not (math.isfinite(constant) and constant > 0):
            raise ValueError(f"constant must be a finite number > 0, got {constant}")
        return LossNormalizer(mode, sequences * float(constant))
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return LossNormalizer(mode, sequences)
    raise ValueError(f"loss_normalizer does not know the divisor of user mode {mode!r}; compute it yourself")
