"""`tinyrl.train(config)` from Python, and `python -m tinyrl.train [overrides]` from a shell (same as tinyrl-train).

The module is callable so that `import tinyrl.train` (which makes `tinyrl.train` name this module) and
`tinyrl.train(config)` never disagree.
"""

import sys
import types

from tinyrl.experiment import train


class _CallableModule(types.ModuleType):
    def __call__(self, config):
        return train(config)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from tinyrl.cli import train_main

    train_main()
