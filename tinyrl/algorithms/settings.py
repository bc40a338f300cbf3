"""The algorithm's settings: `AlgorithmConfig` (the `algorithm:` node of a config and of a preset) and its
rollout correction. Plain dataclasses without torch, so that the config schema (tinyrl/config.py) can hold them and
still answer a bad command line before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RolloutCorrectionConfig:
    """Correction of the rollout/training mismatch (veRL's `algorithm.rollout_correction` names; the math and its
    sources are in tinyrl/algorithms/rollout_correction.py). Mismatch metrics are logged whatever these say."""

    rollout_is: Optional[str] = None  # null: no reweighting | token: truncated importance sampling (TIS)
    rollout_is_threshold: float = 2.0  # TIS cap C on pi_old / pi_rollout per token
    rollout_rs: Optional[str] = None  # null | sequence: drop sequences whose ratio is outside the thresholds
    rollout_rs_threshold: Optional[float] = None  # upper bound on the sequence ratio; null: rollout_is_threshold
    rollout_rs_threshold_lower: Optional[float] = None  # lower bound; null: 1 / upper


@dataclass
class AlgorithmConfig:
    """An algorithm preset (see conf/algorithm/*.yaml): estimator, loss, KL and shaping choices.

    `advantage` and `policy_loss` name a registered function, or a user's as `pkg.module:function` or
    `path/to/file.py:function`; `loss_kwargs` are the policy loss's own keyword arguments (its knobs).
    """

    name: str = "grpo"
    advantage: str = "grpo"
    norm_by_std: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    policy_loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    loss_agg: str = "token-mean"
    loss_agg_normalizer: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    value_clip: float = 0.5
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    overlong: str = "none"  # none | mask | soft
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    loss_kwargs: dict = field(default_factory=dict)  # open: the policy loss's own arguments, e.g. {my_knob: 0.5}
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
