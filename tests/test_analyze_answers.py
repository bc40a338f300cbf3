"""benchmarks/analyze_answers.py: the calculator that writes true results into a model's greedy thinking."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import analyze_answers  # noqa: E402


@pytest.mark.parametrize(
    "text, value",
    [
        ("Try 13+10=", "23"),
        ("Try 7-9=", "-2"),
        ("14+(-1)=", "13"),
        ("7/2=", "7/2"),
        ("(7/2)*2=", "7"),
        ("20/0=", None),
        ("That is 17.", None),
        ("Try 13+10=23", None),
    ],
)
def test_true_result(text, value):
    assert analyze_answers.true_result(text) == value


def _memorise(model, tokenizer, prompt: str, completion: str, steps: int = 300) -> list[int]:
    """Train the real tiny model until greedy decoding after `prompt` reproduces `completion`."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()
    return prompt_ids


def test_calculator_replaces_false_results_and_keeps_them_whole(tiny_model_dir):
    from tinyrl.models import load_policy

    torch.manual_seed(0)
    model, tokenizer = load_policy(tiny_model_dir)
    completion = "\n1+2=19, 19*3=47.</answer>"
    prompt_ids = _memorise(model, tokenizer, "User: make 9.\n<think>", completion)
    stop = ("</answer>",)

    plain = analyze_answers.calculator_answers(model, tokenizer, [prompt_ids], 0, stop)
    assert plain == [""]
    # Without a calculator the model writes what it memorised: two false results.
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)
    assert tokenizer.decode(out[0, len(prompt_ids):]).startswith(completion)

    [text] = analyze_answers.calculator_answers(model, tokenizer, [prompt_ids], 24, stop)
    # 1+2 is 3: the model's own next token ("9", the rest of "19") may not lengthen the forced result.
    assert text.startswith("\n1+2=3")
    assert "1+2=19" not in text and "1+2=39" not in text
    assert analyze_answers.arithmetic_is_right(text + "</think>")
