"""What a Countdown policy's greedy answers look like: how often they check a failed attempt and try again, how
accurate those answers are, and how wrong answers go wrong.

Answers the held-out problems that `tinyrl-train OVERRIDES` would evaluate (the default experiment's test problems),
greedily, with every model directory given (e.g. a run's `sft_model` and its last `checkpoints/step_*/actor`), and
prints one markdown row per model. A wrong answer is put in one of three classes: its trace writes false arithmetic
(`a op b = c` that does not hold); it claims an attempt reached the target when the attempt's last result is another
number (true arithmetic, false claim); or neither (e.g. a true trace copied into a wrong expression).

Usage: .venv/bin/python benchmarks/analyze_answers.py MODEL_DIR [MODEL_DIR ...] [-- OVERRIDES...]
"""

from __future__ import annotations

import re
import sys
from fractions import Fraction

import torch

STEP = re.compile(r"(\(?-?\d+(?:/\d+)?\)?)([-+*/])(\(?-?\d+(?:/\d+)?\)?)=(-?\d+(?:/\d+)?)")
# A checked attempt that missed, in either check style: "29 is not 17." or "Want 17: no."
RETRY = re.compile(r" is not -?\d|Want -?\d+: no\.")
# An attempt that claims the target: "Try 13+10=23, 23-6=17. That is 17." or "... Want 17: yes."
CLAIM = re.compile(r"Try (.*?)\. (?:That is|Want) (-?\d+)(?:: yes)?\.")


def arithmetic_is_right(completion: str) -> bool:
    """True when every `a op b = c` written in the <think> part holds exactly."""
    for a, op, b, c in STEP.findall(completion.split("</think>")[0]):
        x, y, z = (Fraction(v.strip("()")) for v in (a, b, c))
        if op == "/" and y == 0:
            return False
        if {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op] != z:
            return False
    return True


def claims_a_miss_as_a_hit(completion: str) -> bool:
    """True when some attempt says it reached the target although its last written result is another number."""
    for steps, target in CLAIM.findall(completion.split("</think>")[0]):
        results = STEP.findall(steps)
        if results and Fraction(results[-1][3]) != Fraction(target):
            return True
    return False


def main() -> None:
    args = sys.argv[1:]
    models, overrides = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args, [])
    if not models:
        sys.exit(__doc__)
    from tinyrl.compose import load_config
    from tinyrl.models import load_policy
    from tinyrl.prompts import encode_prompts
    from tinyrl.rollout import SamplingConfig, make_engine
    from tinyrl.task import get_task

    cfg = load_config(overrides)
    torch.set_num_threads(cfg.threads)
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    rows = task.dataset(cfg.task.eval_split, cfg.task.eval_size, cfg.task.data_seed)
    greedy = SamplingConfig(max_new_tokens=cfg.rollout.max_response_tokens, temperature=0.0, stop=tuple(task.stop))
    print(f"# {len(rows)} {cfg.task.eval_split} problems, greedy, up to {cfg.rollout.max_response_tokens} tokens\n")
    print("| model | accuracy | answers with a retry | accuracy with a retry | accuracy without | "
          "wrong: false arithmetic | wrong: true arithmetic, false claim | wrong: other | mean tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in models:
        model, tokenizer = load_policy(path)
        prompts = encode_prompts(task, rows, tokenizer, cfg.model.template, cfg.rollout.max_prompt_tokens, path)
        answers = make_engine("hf", model, tokenizer).generate(prompts, greedy)
        correct = [task.reward(a.text, row).correct for a, row in zip(answers, rows)]
        retry = [bool(RETRY.search(a.text)) for a in answers]
        wrong = [a.text for a, ok in zip(answers, correct) if not ok]
        false_arithmetic = [not arithmetic_is_right(t) for t in wrong]
        false_claim = [not f and claims_a_miss_as_a_hit(t) for t, f in zip(wrong, false_arithmetic)]

        def share(flags, of: int | None = None) -> str:
            flags = list(flags)
            total = len(flags) if of is None else of
            return f"{sum(flags) / total:.3f}" if total else "-"

        print(f"| {path} | {share(correct)} | {share(retry)} | {share(c for c, r in zip(correct, retry) if r)} | "
              f"{share(c for c, r in zip(correct, retry) if not r)} | {share(false_arithmetic, len(rows))} | "
              f"{share(false_claim, len(rows))} | "
              f"{share((not f and not c for f, c in zip(false_arithmetic, false_claim)), len(rows))} | "
              f"{sum(len(a.token_ids) for a in answers) / len(answers):.1f} |")


if __name__ == "__main__":
    main()
