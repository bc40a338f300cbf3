"""tinyrl: reinforcement learning from verifiable rewards for small language models.

Research-code entry points (imported lazily, so `import tinyrl` stays light):
- `tinyrl.train(config)`: run a whole experiment from a `TrainConfig`, DictConfig, or a plain dict (over the same
  packaged defaults as `tinyrl-train`); returns the summary.
- `tinyrl.load_config(overrides)`: the config `tinyrl-train OVERRIDES` runs, without the command line.
- `tinyrl.RLTrainer`: the RL loop over objects you built yourself.
- `tinyrl.get_task`, `tinyrl.register_task`, `tinyrl.Reward`, `tinyrl.TaskError`: tasks.
"""

__version__ = "0.1.0"

_LAZY = {
    "RLTrainer": ("tinyrl.trainer", "RLTrainer"),
    "TrainConfig": ("tinyrl.config", "TrainConfig"),
    "load_config": ("tinyrl.compose", "load_config"),
    "get_task": ("tinyrl.task", "get_task"),
    "register_task": ("tinyrl.task", "register_task"),
    "Reward": ("tinyrl.task", "Reward"),
    "TaskError": ("tinyrl.task", "TaskError"),
}


def __getattr__(name: str):
    import importlib

    if name == "train":  # the module tinyrl.train is itself callable: tinyrl.train(config)
        return importlib.import_module("tinyrl.train")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tinyrl' has no attribute {name!r}")
