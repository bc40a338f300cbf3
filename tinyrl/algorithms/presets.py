"""Algorithm presets: the shipped conf/algorithm/*.yaml files, loaded and checked against the registries."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from collections.abc import Mapping

from .advantages import ADVANTAGE_ESTIMATORS
from .aggregation import AGG_MODES
from .kl import KL_ESTIMATORS
from .policy_losses import POLICY_LOSSES
from .settings import AlgorithmConfig

# Every setting of `AlgorithmConfig` with a plain value: a preset states each one. The mappings (`loss_kwargs`,
# `rollout_correction`) are optional in a preset.
PRESET_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AlgorithmConfig) if f.default is not dataclasses.MISSING
)
OPTIONAL_PRESET_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AlgorithmConfig) if f.default is dataclasses.MISSING
)
OVERLONG_MODES = ("none", "mask", "soft")


def _preset_dir():
    return importlib.resources.files("tinyrl.conf") / "algorithm"


def available_presets() -> list[str]:
    """Names of the algorithm presets shipped in `tinyrl/conf/algorithm/`."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def validate_preset(preset: Mapping[str, object], source: str = "preset") -> None:
    """Raise `ValueError` naming `source` and the key if `preset` lacks a key, has an extra one, or names an
    unknown estimator / policy loss / aggregation mode / KL estimator / overlong mode."""
    missing = [k for k in PRESET_KEYS if k not in preset]
    extra = sorted(set(preset) - set(PRESET_KEYS) - set(OPTIONAL_PRESET_KEYS))
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing}")
    if extra:
        raise ValueError(f"{source}: unknown key(s) {extra}; valid keys: {list(PRESET_KEYS)}")
    choices = {
        "advantage": ADVANTAGE_ESTIMATORS,
        "policy_loss": POLICY_LOSSES,
        "loss_agg": AGG_MODES,
        "kl_estimator": KL_ESTIMATORS,
        "overlong": OVERLONG_MODES,
    }
    for key, valid in choices.items():
        if preset[key] not in valid:
            raise ValueError(f"{source}: {key}={preset[key]!r} is not one of {sorted(valid)}")


@functools.lru_cache(maxsize=None)
def _read_preset_text(name: str) -> str:
    return (_preset_dir() / f"{name}.yaml").read_text(encoding="utf-8")


def load_preset(name: str) -> dict:
    """The algorithm preset `name` (conf/algorithm/<name>.yaml) as a plain dict with every key of `PRESET_KEYS`."""
    from omegaconf import OmegaConf

    available = available_presets()
    if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_\-]+", name)) or name not in available:
        raise ValueError(f"unknown algorithm preset {name!r}; available: {available}")
    preset = OmegaConf.to_container(OmegaConf.create(_read_preset_text(name)), resolve=True)
    if not isinstance(preset, dict):
        raise ValueError(f"algorithm preset {name}.yaml must hold a mapping")
    validate_preset(preset, source=f"algorithm preset {name}.yaml")
    return preset
