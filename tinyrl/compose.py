"""Compose the packaged Hydra config tree from Python, for research code and tests."""

from __future__ import annotations

from typing import Sequence

from tinyrl.config import TrainConfig, register_configs, to_config


def load_config(overrides: Sequence[str] = (), config_name: str = "train") -> TrainConfig:
    """The config `tinyrl-train OVERRIDES...` would run, as a validated `TrainConfig`.

    Example: `load_config(["experiment=tiny_cpu", "trainer.steps=5"])`.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="tinyrl.conf", version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return to_config(cfg)
