"""veRL 0.9.1's own scorers as compute_score functions, the way a veRL user writes a custom reward file.

veRL's `verl/__init__.py` imports ray; `verl_without_ray/` loads the scorer modules without it (see there).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "verl_without_ray"))

from verl.utils.reward_score import default_compute_score, math_verify, prime_math  # noqa: E402


def math_verify_score(data_source, solution_str, ground_truth, extra_info=None):
    """veRL's math_verify scorer: a process pool runs Math-Verify."""
    return math_verify.compute_score(solution_str, ground_truth)


def prime_math_score(data_source, solution_str, ground_truth, extra_info=None):
    """veRL's prime_math scorer: sympy comparisons under veRL's `timeout_limit` (a process per comparison)."""
    return float(prime_math.compute_score(solution_str, ground_truth)[0])


def verl_default_score(data_source, solution_str, ground_truth, extra_info=None):
    """veRL's dispatch by data source (numina_* rows go to prime_math)."""
    return default_compute_score(data_source, solution_str, ground_truth, extra_info)


_SCORERS = {"math_verify": math_verify_score, "prime_math": prime_math_score, "default": verl_default_score}


def by_name(data_source, solution_str, ground_truth, extra_info=None):
    """The scorer the row's extra_info names: one task, and one set of workers, for all three."""
    return _SCORERS[extra_info["scorer"]](data_source, solution_str, ground_truth, extra_info)
