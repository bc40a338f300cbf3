"""The RL algorithms core: advantage estimators, policy and value losses, KL estimators, loss aggregation.

Everything here is a pure tensor function: no model, engine or run inside. Token-level tensors are
`[B, T]` over response tokens and `response_mask` is 1 on real response tokens. Each estimator, loss,
KL estimator and aggregation mode is registered by name, so a config can pick it and a user can add one.

One module per family; every public name is importable from `tinyrl.algorithms` itself:

- `advantages`: the estimators (GAE, GRPO, Dr. GRPO, RLOO, OPO, REINFORCE++) and `compute_advantages`
- `groups`: per-group statistics of sequence scores; `groups_with_reward_variance` (DAPO dynamic sampling)
- `rewards`: outcome rewards placed on tokens; DAPO's overlong penalty
- `policy_losses`: PPO-clip, GSPO, CISPO, REINFORCE and `policy_loss`
- `value`: the clipped value loss
- `kl`: KL estimators, the KL loss term, KL-shaped rewards
- `aggregation`: loss aggregation modes and the mini-batch `loss_normalizer`
- `masked`: masked mean and whitening
- `logprobs`: chunked log-probs and entropy from logits
- `rollout_correction`: rollout/training mismatch metrics, truncated importance sampling, sequence rejection
- `objective`: `rl_objective`, the whole loss of one micro-batch (policy loss, KL, entropy, rollout correction)
  in one function, and `StepMetrics`, which combines its metrics over micro-batches
- `settings`: `AlgorithmConfig`, the algorithm's settings (the config's `algorithm:` node; no torch)
- `presets`: the shipped algorithm presets (conf/algorithm/*.yaml), checked against `AlgorithmConfig`

A policy loss or an advantage estimator is chosen by its registered name, or given as `pkg.module:function` or
`path/to/file.py:function` (loaded on first use and registered under that name).

Behaviour on awkward input (each one tested):

- Positions outside `response_mask` never influence a result, whatever they hold (NaN and inf included):
  inputs are replaced by 0 there before any arithmetic, so neither values nor gradients can pick up NaN.
- Rows with no response token get zero advantages, take no part in group statistics, contribute nothing to a
  loss and are not counted as sequences by the `seq-*` aggregation modes.
- A group of one sample, or a group whose rewards are all equal, gets exactly zero advantages from every group
  estimator, in float32, bfloat16 and float64 alike.
- Rewards, values, advantages and current-policy log-probs must be finite on response tokens, and no log-prob may
  be NaN there; otherwise a `ValueError` names the tensor and the offending rows. `old_logprobs` and
  `ref_logprobs` may be +-inf (a sampler can report them): log-ratios are clamped before `exp`, so no ratio
  overflows.

Gradient accumulation: a trainer that splits a mini-batch into micro-batches computes the whole mini-batch's
divisor once with `loss_normalizer(mode, [mask of every micro-batch])` and passes it as `normalizer=` to each
micro-batch's `policy_loss` / `value_loss` / `kl_loss` / `aggregate`. The sum of the micro-batch losses is then
exactly the whole mini-batch loss (and its gradient is the whole mini-batch gradient) for every aggregation
mode, whatever each micro-batch's padded length.
"""

# The package loads each family module on first use of one of its names, so that `tinyrl.algorithms.settings`
# (the config schema's algorithm node) imports without torch. Besides `__all__`, the individual estimator and loss
# functions, the type aliases and the constants are importable from here.
import importlib

_NAMES = {
    "_common": ("LOG_RATIO_CLAMP", "is_function_spec", "resolve_function"),
    "advantages": (
        "ADVANTAGE_ESTIMATORS", "AdvantageEstimator", "compute_advantages", "dr_grpo_advantages", "gae_advantages",
        "grpo_advantages", "opo_advantages", "register_advantage_estimator", "reinforce_pp_advantages",
        "reinforce_pp_baseline_advantages", "rloo_advantages",
    ),
    "aggregation": ("AGG_MODES", "LossNormalizer", "Normalizer", "aggregate", "loss_normalizer"),
    "groups": ("groups_with_reward_variance",),
    "kl": ("KL_ESTIMATORS", "KL_LOG_RATIO_CLAMP", "kl_loss", "kl_penalty", "kl_shaped_rewards"),
    "logprobs": ("DEFAULT_CHUNK_SIZE", "entropy_from_logits", "logprobs_from_logits"),
    "masked": ("masked_mean", "masked_whiten"),
    "objective": ("LOSS_TERMS", "StepMetrics", "rl_objective"),
    "policy_losses": (
        "POLICY_LOSSES", "PolicyLossFn", "cispo_policy_loss", "gspo_policy_loss", "importance_log_ratio",
        "policy_loss", "ppo_policy_loss", "register_policy_loss", "reinforce_policy_loss",
    ),
    "presets": ("OPTIONAL_PRESET_KEYS", "OVERLONG_MODES", "PRESET_KEYS", "available_presets", "load_preset",
                "validate_preset"),
    "rewards": ("overlong_penalty", "token_rewards_from_outcome"),
    "rollout_correction": ("ROLLOUT_IS_LEVELS", "ROLLOUT_RS_LEVELS", "rollout_correction_weights",
                           "rollout_log_ratio", "rollout_mismatch_metrics"),
    "settings": ("AlgorithmConfig", "RolloutCorrectionConfig"),
    "value": ("value_loss",),
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # found directly next time
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "KL_LOG_RATIO_CLAMP",
    "POLICY_LOSSES",
    "PRESET_KEYS",
    "LossNormalizer",
    "aggregate",
    "available_presets",
    "compute_advantages",
    "entropy_from_logits",
    "groups_with_reward_variance",
    "importance_log_ratio",
    "kl_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "load_preset",
    "logprobs_from_logits",
    "loss_normalizer",
    "masked_mean",
    "masked_whiten",
    "overlong_penalty",
    "policy_loss",
    "register_advantage_estimator",
    "register_policy_loss",
    "ROLLOUT_IS_LEVELS",
    "ROLLOUT_RS_LEVELS",
    "rollout_correction_weights",
    "rollout_log_ratio",
    "rollout_mismatch_metrics",
    "token_rewards_from_outcome",
    "validate_preset",
    "value_loss",
]
