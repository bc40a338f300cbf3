"""Reward code written the way TRL's and veRL's documentation write it, used unchanged by the tests.

Nothing here imports tinyrl: these are the functions a user brings from another library.
"""

import json
import os
import re


# -- TRL style: batched keyword arguments, one value per completion ---------------------------------------------


def boxed_match_reward(completions, ground_truth, **kwargs):
    """1.0 when the text inside \\boxed{} equals the ground truth column (standard, plain-text completions)."""
    found = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    answers = [m.group(1) if m else "" for m in found]
    return [1.0 if a == gt else 0.0 for a, gt in zip(answers, ground_truth)]


def format_reward(completions, **kwargs):
    """Conversational completions: 1.0 for a <think>...</think> block followed by an answer."""
    pattern = r"^<think>.*?</think>.+$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, c, re.DOTALL) else 0.0 for c in contents]


def length_reward(completions, **kwargs):
    """Works for both formats: prefers shorter answers, in [0, 1]."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 / (1.0 + len(t)) for t in texts]


def only_even_rows(completions, row_id, **kwargs):
    """None ("does not apply") for odd rows: TRL skips those."""
    return [1.0 if rid % 2 == 0 else None for rid in row_id]


def record_call(prompts, completions, completion_ids, **kwargs):
    """Writes what it was called with to $RECORD_CALLS (one JSON line per call), then scores 0.5."""
    seen = {
        "prompts": prompts, "completions": completions, "completion_ids": completion_ids,
        "columns": {k: v for k, v in kwargs.items() if k not in ("trainer_state", "log_extra", "log_metric")},
        "trainer_state": repr(kwargs.get("trainer_state")),
        "callables": sorted(k for k in ("log_extra", "log_metric") if callable(kwargs.get(k))),
    }
    kwargs["log_metric"]("recorded", 1.0)
    kwargs["log_extra"]("note", ["seen"])
    with open(os.environ["RECORD_CALLS"], "a") as f:
        f.write(json.dumps(seen) + "\n")
    return [0.5] * len(completions)


def wrong_length_reward(completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def nan_reward(completions, **kwargs):
    return [float("nan")] * len(completions)


def needs_missing_column(completions, answer_text, **kwargs):
    return [1.0 for _ in answer_text]


def divides_by_zero(completions, **kwargs):
    """Broken on every completion."""
    return [len(c) / 0 for c in completions]


# -- veRL style: one sample per call ----------------------------------------------------------------------------


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """GSM8K-like: the number after the last '####' must equal the ground truth; 0.1 for a '####' line at all."""
    match = re.findall(r"####\s*(-?[0-9.,]+)", solution_str)
    if not match:
        return 0.0
    return 1.0 if match[-1].replace(",", "") == str(ground_truth) else 0.1


def compute_score_dict(data_source, solution_str, ground_truth, extra_info=None):
    """The dict form: 'score' is the reward, the other keys are logged."""
    correct = str(ground_truth) in solution_str
    return {"score": 2.0 if correct else 0.0, "acc": correct, "length": len(solution_str),
            "pred": solution_str[-5:], "source_seen": data_source}


def compute_score_two_args(solution_str, ground_truth):
    """Old veRL scorers take only what they use."""
    return float(str(ground_truth) in solution_str)


def compute_score_without_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}


def _text(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def length_unless_divisible(completions, **kwargs):
    """None when the characters' code points add up to a multiple of 3; else the length modulo 5."""
    return [None if sum(map(ord, _text(c))) % 3 == 0 else float(len(_text(c)) % 5) for c in completions]


def vowels_unless_even(completions, **kwargs):
    """None when the characters' code points add up to an even number; else the number of vowels."""
    return [None if sum(map(ord, _text(c))) % 2 == 0 else float(sum(ch in "aeiou" for ch in _text(c)))
            for c in completions]


def never_formatted(completions, **kwargs):
    """A tag check no completion passes: 0.0 for every one."""
    return [1.0 if _text(c).startswith("<answer>") and _text(c).endswith("</answer>") and False else 0.0
            for c in completions]


def exact_answer(completions, ground_truth, **kwargs):
    """1.0 when the completion is the ground truth, stripped."""
    return [float(_text(c).strip() == str(gt)) for c, gt in zip(completions, ground_truth)]
