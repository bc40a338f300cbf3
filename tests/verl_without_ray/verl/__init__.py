"""veRL's package root without what its own `verl/__init__.py` imports (ray, tensordict, DataProto).

The scorers in `verl.utils.reward_score` need none of that, so tests put this directory first on `sys.path`: `import
verl` finds this file, whose `__path__` points into the installed veRL, and `verl.utils.reward_score...` loads veRL's
own modules from there. Processes started with the "spawn" method get the parent's `sys.path`, so the process pool of
veRL's `math_verify` scorer finds it too.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

for _entry in sys.path:
    _candidate = os.path.join(os.path.abspath(_entry or os.curdir), "verl")
    if _candidate != _HERE and os.path.isfile(os.path.join(_candidate, "utils", "reward_score", "__init__.py")):
        __path__ = [_candidate]
        with open(os.path.join(_candidate, "version", "version")) as _f:
            __version__ = _f.read().strip()
        break
else:
    raise ImportError("veRL is not installed (pip install --no-deps verl==0.9.1)")
