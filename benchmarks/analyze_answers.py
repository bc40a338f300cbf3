"""What a Countdown policy's greedy answers look like: how often they check a failed attempt and try again, how
accurate those answers are, and how wrong answers go wrong.

Answers the held-out problems that `tinyrl-train OVERRIDES` would evaluate (the default experiment's test problems),
greedily, with every model directory given (e.g. a run's `sft_model` and its last `checkpoints/step_*/actor`), and
prints one markdown row per model. A wrong answer is put in one of three classes: its trace writes false arithmetic
(`a op b = c` that does not hold); it claims an attempt reached the target when the attempt's last result is another
number (true arithmetic, false claim); or neither (e.g. a true trace copied into a wrong expression). The last
column answers the same problems again with a calculator: after every `a op b =` the model writes, the true result
is written for it. A model whose verdicts and answers follow the results in its thinking gains from that; one whose
thinking does not decide its answer does not.

Usage: .venv/bin/python benchmarks/analyze_answers.py MODEL_DIR [MODEL_DIR ...] [-- OVERRIDES...]
"""

from __future__ import annotations

import re
import sys
from fractions import Fraction

import torch

PENDING = re.compile(r"(\(?-?\d+(?:/\d+)?\)?)([-+*/])(\(?-?\d+(?:/\d+)?\)?)=$")  # an `a op b =` awaiting its result
STEP = re.compile(r"(\(?-?\d+(?:/\d+)?\)?)([-+*/])(\(?-?\d+(?:/\d+)?\)?)=(-?\d+(?:/\d+)?)")
# A checked attempt that missed, in either check style: "29 is not 17." or "Want 17: no."
RETRY = re.compile(r" is not -?\d|Want -?\d+: no\.")
# An attempt that claims the target: "Try 13+10=23, 23-6=17. That is 17." or "... Want 17: yes."
CLAIM = re.compile(r"Try (.*?)\. (?:That is|Want) (-?\d+)(?:: yes)?\.")


def _exact(a: str, op: str, b: str) -> Fraction | None:
    """`a op b` exactly, for operands as written ("7", "(-3)", "7/2"); None for a division by zero."""
    x, y = Fraction(a.strip("()")), Fraction(b.strip("()"))
    if op == "/" and y == 0:
        return None
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]


def arithmetic_is_right(completion: str) -> bool:
    """True when every `a op b = c` written in the <think> part holds exactly."""
    for a, op, b, c in STEP.findall(completion.split("</think>")[0]):
        value = _exact(a, op, b)
        if value is None or value != Fraction(c):
            return False
    return True


def true_result(text: str) -> str | None:
    """The exact value of the `a op b =` that `text` ends with ("7", "-3", "7/2"), or None: Countdown's own
    calculator (`task.kwargs.calculator`) computes it."""
    from tinyrl.tasks.countdown import CountdownCalculator

    return CountdownCalculator.result(text)


@torch.no_grad()
def calculator_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: tuple[str, ...],
                       batch_size: int = 256) -> list[str]:
    """Greedy completions in which each `a op b =` the model writes is followed by its true result, as forced tokens.

    The token after a forced result is the model's likeliest one that does not extend the number. Decodes token by
    token over transformers' own cache (left-padded rows); a row ends at a stop string or after `max_new_tokens`
    tokens, forced ones included.
    """
    from tinyrl.rollout.kv_decode import cache_argument

    model.eval()
    cache = cache_argument(model)  # the keyword (and output field) under which this transformers passes the cache
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # tokens that would lengthen a result just written (`=23` then `4`): not allowed right after one
    pieces = [tokenizer.decode([t]) for t in range(len(tokenizer))]
    continues_number = torch.tensor([bool(piece) and piece[0] in "0123456789/" for piece in pieces])
    # "=" merged with what follows (`=-`): written as a bare "=" after an `a op b`, so the result is the calculator's
    equals = tokenizer("=", add_special_tokens=False)["input_ids"]
    merged_equals = {t for t, piece in enumerate(pieces) if piece.startswith("=") and piece != "="}
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        new: list[list[int]] = [[] for _ in chunk]
        forced: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        after_result = [False] * len(chunk)
        position = positions[:, -1:]
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1]
            chosen = logits.argmax(-1).tolist()
            for i in range(len(chunk)):
                if done[i]:
                    continue
                if forced[i]:
                    token = forced[i].pop(0)
                    after_result[i] = not forced[i]
                elif after_result[i]:
                    vocab = min(logits.shape[-1], continues_number.shape[0])
                    token = int(logits[i, :vocab].masked_fill(continues_number[:vocab], float("-inf")).argmax())
                    after_result[i] = False
                else:
                    token = chosen[i]
                    if token in merged_equals and len(equals) == 1 and PENDING.search(tokenizer.decode(new[i]) + "="):
                        token = equals[0]
                chosen[i] = token
                new[i].append(token)
                text = tokenizer.decode(new[i])
                if any(s in text for s in stop):
                    done[i] = True
                elif not forced[i] and text.endswith("="):
                    value = true_result(text)
                    if value is not None:
                        forced[i] = tokenizer(value, add_special_tokens=False)["input_ids"]
            if all(done):
                break
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=mask.dtype)], dim=1)
            position = position + 1
            out = model(input_ids=torch.tensor(chosen)[:, None], attention_mask=mask, position_ids=position,
                        use_cache=True, **{cache: out[cache]})
        texts.extend(tokenizer.decode(row) for row in new)
    return texts


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
    # with `task.kwargs.calculator=true` the answers are the task's own (its calculator writes into them)
    greedy = SamplingConfig(max_new_tokens=cfg.rollout.max_response_tokens, temperature=0.0, stop=tuple(task.stop),
                            feedback=getattr(task, "feedback", None))
    print(f"# {len(rows)} {cfg.task.eval_split} problems, greedy, up to {cfg.rollout.max_response_tokens} tokens\n")
    print("| model | accuracy | answers with a retry | accuracy with a retry | accuracy without | "
          "wrong: false arithmetic | wrong: true arithmetic, false claim | wrong: other | mean tokens | "
          "accuracy with a calculator |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in models:
        model, tokenizer = load_policy(path)
        prompts = encode_prompts(task, rows, tokenizer, cfg.model.template, cfg.rollout.max_prompt_tokens, path)
        answers = make_engine("hf", model, tokenizer).generate(prompts, greedy)
        correct = [task.reward(a.text, row).correct for a, row in zip(answers, rows)]
        calculated = calculator_answers(model, tokenizer, prompts, cfg.rollout.max_response_tokens, tuple(task.stop))
        with_calculator = [task.reward(text, row).correct for text, row in zip(calculated, rows)]
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
              f"{sum(len(a.token_ids) for a in answers) / len(answers):.1f} | {share(with_calculator)} |")


if __name__ == "__main__":
    main()
