"""The RL objective of one micro-batch, in one function: policy loss, KL term, entropy bonus, rollout correction.

    L = agg(w_t * l_t) + beta * agg(KL_t(pi || pi_ref)) - c_H * agg(H_t)

- l_t: the policy loss `algorithm.policy_loss` (PPO-clip, GSPO, CISPO, REINFORCE, or a user's), with its own
  arguments `algorithm.loss_kwargs`;
- w_t: rollout-correction weights (truncated importance sampling, sequence rejection; Yao et al. 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training"), 1 when `algorithm.rollout_correction` is off;
- KL_t: the estimator `algorithm.kl_estimator` (Schulman 2020, "Approximating KL Divergence") weighted by
  beta = `algorithm.kl_coef`, GRPO's loss term (Shao et al. 2024, "DeepSeekMath"); left out of the loss when the
  KL is in the reward instead (`kl_in_reward`, Ouyang et al. 2022), but still reported;
- H_t: the policy's entropy, an exploration bonus with weight c_H = `algorithm.entropy_coef` (Williams & Peng
  1991, "Function Optimization using Connectionist Reinforcement Learning Algorithms"; A3C, Mnih et al. 2016);
- agg: `algorithm.loss_agg` with the divisor of the WHOLE mini-batch (`loss_normalizer`), so the micro-batches'
  losses add up to the mini-batch's loss and their gradients to its gradient.

`rl_objective` is pure: tensors and settings in, `(loss, metrics)` out. `StepMetrics` adds up the metrics of an
optimizer step's micro-batches the way the mini-batch's own would be.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .aggregation import Normalizer, aggregate
from .kl import kl_penalty
from .policy_losses import policy_loss
from .rollout_correction import rollout_correction_weights, rollout_mismatch_metrics
from .settings import AlgorithmConfig

# Metrics that are parts of the loss (already divided by the whole mini-batch's divisor): they add up over
# micro-batches. The rest are averages over a micro-batch's response tokens, or extremes (`*_max`, `*_min`).
LOSS_TERMS = frozenset({"losses/policy", "policy/kl", "policy/entropy"})


def rl_objective(
    a: AlgorithmConfig,
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    response_mask: Tensor,
    normalizer: Normalizer,
    *,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss to minimise on one micro-batch (formula in the module docstring) and what it measured.

    Tensors are `[B, T]` over response tokens: `logprobs` log pi_theta(y_t) (with gradient), `old_logprobs`
    log pi_old(y_t) (None: exactly on-policy, pi_old = pi_theta detached), `advantages` A_t, `response_mask` 1 on
    the policy's own tokens, `ref_logprobs` log pi_ref(y_t) (None: no KL term), `entropy` H(pi_theta(.|y_<t))
    (None: no entropy term), `rollout_logprobs` log pi_rollout(y_t) from the sampler (None: no mismatch report and
    no correction). `a` holds the settings (`AlgorithmConfig`, or anything with its attribute names).

    Metrics (python floats): `losses/policy`, `policy/kl`, `policy/entropy` (parts of the mini-batch loss);
    `policy/<stat>`: what the policy loss returns (its ratio statistics, and only the statistics the loss itself
    has, e.g. `clip_frac_low` for a clipped loss or a user loss's own); `rollout/<stat>`: the sampler's mismatch
    with pi_old and the correction's statistics.
    """
    metrics: dict[str, float] = {}
    old = logprobs.detach() if old_logprobs is None else old_logprobs  # [B, T]

    # rollout correction: w_t = min(pi_old / pi_rollout, C) * 1[sequence ratio within bounds]   [B, T]
    c = a.rollout_correction
    correcting = c.rollout_is is not None or c.rollout_rs is not None
    token_weights = None
    if rollout_logprobs is None:
        if correcting:
            raise ValueError("algorithm.rollout_correction needs the sampler's log-probs (batch.rollout_logprobs)")
    else:
        sampler_gap = rollout_mismatch_metrics(old.detach().float(), rollout_logprobs, response_mask)
        metrics.update({f"rollout/{key}": value for key, value in sampler_gap.items()})
        if correcting:
            token_weights, stats = rollout_correction_weights(
                old.detach().float(), rollout_logprobs, response_mask, rollout_is=c.rollout_is,
                rollout_is_threshold=c.rollout_is_threshold, rollout_rs=c.rollout_rs,
                rollout_rs_threshold=c.rollout_rs_threshold, rollout_rs_threshold_lower=c.rollout_rs_threshold_lower,
            )
            metrics.update({f"rollout/{key}": value for key, value in stats.items()})

    # policy loss: agg(w_t * l_t)   scalar
    loss, stats = policy_loss(
        a.policy_loss, logprobs, old, advantages, response_mask, clip_low=a.clip_low, clip_high=a.clip_high,
        dual_clip=a.dual_clip, agg=a.loss_agg, normalizer=normalizer, token_weights=token_weights, **a.loss_kwargs,
    )
    metrics["losses/policy"] = loss.item()
    for key, value in stats.items():
        name = f"policy/{key}"
        if name in LOSS_TERMS:
            raise ValueError(f"policy loss {a.policy_loss!r} returns a statistic {key!r}, a name the objective uses "
                             f"for its own term; rename it")
        metrics[name] = value

    # KL term: + beta * agg(KL_t)   scalar (reported; in the loss unless the KL is in the reward)
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, a.kl_estimator)  # [B, T]
        kl_term = aggregate(kl, response_mask, a.loss_agg, normalizer=normalizer)
        if not a.kl_in_reward:
            loss = loss + a.kl_coef * kl_term
        metrics["policy/kl"] = kl_term.item()

    # entropy bonus: - c_H * agg(H_t)   scalar (reported whatever its weight)
    if entropy is not None:
        entropy_term = aggregate(entropy, response_mask, a.loss_agg, normalizer=normalizer)
        if a.entropy_coef:
            loss = loss - a.entropy_coef * entropy_term
        metrics["policy/entropy"] = entropy_term.item()
    return loss, metrics


class StepMetrics:
    """The metrics of one optimizer step's micro-batches, combined into the mini-batch's.

    Loss terms add up (divided by `ranks`: under data parallelism each of them holds its loss times the number of
    ranks, see `loss_normalizer`);
    token averages are weighted by each micro-batch's share of the mini-batch's response tokens (`token_share`);
    `*_max` and `*_min` keep the extreme. `sums`, `maxima` and `minima` are what `World.reduce_metrics` combines
    over ranks.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.minima: dict[str, float] = {}

    def add(self, metrics: Mapping[str, float], token_share: float, ranks: int = 1) -> None:
        for key, value in metrics.items():
            if key in LOSS_TERMS:
                self.sums[key] = self.sums.get(key, 0.0) + value / ranks
            elif key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, value), value)
            elif key.endswith("_min"):
                self.minima[key] = min(self.minima.get(key, value), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + token_share * value
