"""`tinyrl.train(config)` from Python, and `python -m tinyrl.train [overrides]` from a shell (same as tinyrl-train).

The module is callable so that `import tinyrl.train` (which makes `tinyrl.train` name this module) and
`tinyrl.train(config)` never disagree. The experiment is imported on the first call, so a command-line config
error is reported before torch loads.
"""

import sys
import types


def train(config):
    """`tinyrl.experiment.train`: run a whole experiment; a plain dict gets the same defaults as `tinyrl-train`."""
    from tinyrl.experiment import train as run_experiment

    return run_experiment(config)


class _CallableModule(types.ModuleType):
    def __call__(self, config):
        return train(config)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from tinyrl.cli import train_main

    train_main()
