"""Turning task rows into prompt text and token ids, for base models (raw template) and instruct models (chat)."""

from __future__ import annotations

from typing import Sequence


def render_prompt(task, row: dict, tokenizer, template: str = "base") -> str:
    """The text the policy continues: the task's raw prompt, or its chat messages through the chat template."""
    if template == "base":
        return task.prompt(row)
    if template == "chat":
        text = tokenizer.apply_chat_template(task.messages(row), tokenize=False, add_generation_prompt=True)
        return text + getattr(task, "chat_prefix", "")
    raise ValueError(f"model.template: must be 'base' or 'chat', got {template!r}")


def encode_prompts(task, rows: Sequence[dict], tokenizer, template: str, max_tokens: int, where: str) -> list[list[int]]:
    """Token ids of every row's prompt; a prompt longer than `max_tokens` is an error naming the row."""
    texts = [render_prompt(task, row, tokenizer, template) for row in rows]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(encoded):
        if len(ids) > max_tokens:
            raise ValueError(
                f"rollout.max_prompt_tokens: the prompt of {where} row {i} has {len(ids)} tokens, more than "
                f"{max_tokens}; raise rollout.max_prompt_tokens or shorten the task's prompt"
            )
        if not ids:
            raise ValueError(f"{where} row {i}: the prompt renders to no tokens")
    return encoded
