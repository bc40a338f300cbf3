"""Compose the packaged Hydra config tree: the one way every entry point turns overrides into a run's config.

`load_config(overrides)` is exactly the config `tinyrl-train OVERRIDES...` runs (the command line calls it), and
`config_from_dict(d)` composes the same packaged defaults under a plain dict, so `tinyrl.train(d)` agrees with
both. A resumed run (`resume=true`) runs its own saved config; the overrides given with it are checked against
it by `tinyrl.rundir.resumed_config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tinyrl.config import ConfigError, TrainConfig, describe_unknown, register_configs, to_config, unknown_keys

__all__ = ["compose", "load_config", "config_from_dict", "override_keys", "dict_keys"]


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The packaged config `config_name` (train, sft, eval, data) with Hydra overrides applied.

    Hydra's errors become a one-line `ConfigError` naming the override or key. A task argument the task preset does
    not list (`task.kwargs.NAME=VALUE` without Hydra's `+`) is added: the task itself says, when it is built,
    whether it takes that argument.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="tinyrl.conf", version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except Exception as err:
        if type(err).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        added = _task_argument_added(overrides, err)
        if added is None:
            raise ConfigError(_one_line(err)) from err
    finally:
        GlobalHydra.instance().clear()
    return compose(config_name, added)


def _task_argument_added(overrides: Sequence[str], err: BaseException) -> list[str] | None:
    """`overrides` with `+` before the `task.kwargs.NAME=...` override Hydra refused as a new key, or None."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    if not key or not str(key).startswith("task.kwargs.") or "not in struct" not in str(cause or err):
        return None
    out, found = [], False
    for override in overrides:
        if not found and override.split("=", 1)[0] == key:
            override, found = f"+{override}", True
        out.append(override)
    return out if found else None


def load_config(overrides: Sequence[str] = (), config_name: str = "train") -> TrainConfig:
    """The config `tinyrl-train OVERRIDES...` runs, as a validated `TrainConfig`.

    Example: `load_config(["experiment=tiny_cpu", "trainer.steps=5"])`. With `resume=...` it is the run's saved
    config, updated with those overrides that are safe to change mid-run (others are refused, naming them).
    """
    given = OmegaConf.to_container(compose(config_name, overrides), resolve=True)
    return _settle(given, override_keys(overrides), config_name)


def config_from_dict(config: Mapping[str, Any], config_name: str = "train") -> TrainConfig:
    """A plain dict over the packaged defaults (what `tinyrl-train` composes), e.g. `{"trainer": {"steps": 5}}`."""
    unknown = unknown_keys(config)
    if unknown:
        raise ConfigError("; ".join(f"{key}: {describe_unknown(key)}" for key in unknown))
    base = compose(config_name)
    try:
        merged = OmegaConf.merge(base, config)
    except Exception as err:
        raise ConfigError(_one_line(err)) from err
    return _settle(OmegaConf.to_container(merged, resolve=True), dict_keys(config), config_name)


def _settle(given: dict, named: set[str], config_name: str) -> TrainConfig:
    from tinyrl.rundir import resumed_config

    unknown = unknown_keys(given)
    if unknown:
        raise ConfigError("; ".join(f"{key}: {describe_unknown(key)}" for key in unknown))
    resumed = resumed_config(given, named, lambda: OmegaConf.to_container(compose(config_name), resolve=True))
    return to_config(resumed if resumed is not None else given)


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys that Hydra overrides name (`+trainer.steps=3` -> `trainer.steps`; groups by their name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group for o in parsed if not o.key_or_group.startswith("hydra")}


def dict_keys(config: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted leaf keys a nested dict sets (`{"trainer": {"steps": 3}}` -> `{"trainer.steps"}`)."""
    keys: set[str] = set()
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            keys |= dict_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _one_line(err: BaseException) -> str:
    """Hydra's and omegaconf's multi-line messages as one line naming the key."""
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    if full_key:
        detail = str(cause if cause is not None else err).splitlines()[0]
        if "not in" in detail and "struct" not in detail:  # a key the schema does not define
            return f"{full_key}: {describe_unknown(full_key)}"
        if "not in struct" in detail:  # a key inside an open mapping: Hydra wants `+` to add it
            return f"{full_key}: not set yet; add it with +{full_key}=VALUE"
        return f"{full_key}: {detail}"
    options = getattr(err, "options", None)
    if options:
        return f"{str(err).splitlines()[0]}; choose from {', '.join(options)}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("See https")]
    if type(err).__name__ == "OverrideParseException":
        lines.insert(0, "an override does not parse:")
    return " ".join(lines)
