"""Turning task rows into prompt text and token ids, for base models (raw template) and instruct models (chat).

`model.template`: `base` renders the task's raw prompt, `chat` its chat messages through the tokenizer's chat
template, `auto` chat when the tokenizer has a chat template and base otherwise. A chat template may add text of
its own (most add a default system prompt when the messages have none); `template_line` says which template a run
uses and what it adds, for the console.
"""

from __future__ import annotations

from typing import Sequence

TEMPLATES = ("base", "chat", "auto")


def resolve_template(template: str, tokenizer) -> str:
    """`base` or `chat`: `auto` is chat when the tokenizer has a chat template."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "base"
    if template in ("base", "chat"):
        return template
    raise ValueError(f"model.template: must be one of {', '.join(TEMPLATES)}, got {template!r}")


def render_prompt(task, row: dict, tokenizer, template: str = "base") -> str:
    """The text the policy continues: the task's raw prompt, or its chat messages through the chat template."""
    if resolve_template(template, tokenizer) == "base":
        return task.prompt(row)
    text = tokenizer.apply_chat_template(task.messages(row), tokenize=False, add_generation_prompt=True)
    return text + getattr(task, "chat_prefix", "")


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


def added_system_prompt(tokenizer, messages: Sequence[dict]) -> str | None:
    """The system prompt the tokenizer's chat template adds to `messages` on its own ("" when it adds none), or
    None when that cannot be told (no chat template, or it rejects a system message).

    The template renders `messages` once as they are and once after an explicit system message with marker text;
    where the two renderings differ in front of the first message's content, the first one holds what the template
    put in the system message's place.
    """
    if not getattr(tokenizer, "chat_template", None) or not messages:
        return None
    if any(m.get("role") == "system" for m in messages):
        return ""
    marker = "\u2063tinyrl-system\u2063"
    try:
        plain = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": marker}, *messages], tokenize=False,
                                               add_generation_prompt=True)
    except Exception:
        return None
    content = str(messages[0].get("content", ""))
    if marker not in marked or content not in plain or content not in marked:
        return None
    plain, marked = plain[: plain.index(content)], marked[: marked.index(content)]
    head = marked[: marked.index(marker)]
    tail = marked[marked.index(marker) + len(marker):]
    if not (plain.startswith(head) and plain.endswith(tail) and len(plain) >= len(head) + len(tail)):
        return ""  # the system turn's frame is absent when no system message is given: nothing was added
    return plain[len(head): len(plain) - len(tail)]


def template_line(task, row: dict, tokenizer, template: str) -> str:
    """One console line: which template renders the prompts (`model.template`), and the system prompt a chat
    template adds on its own, or that a base run leaves the tokenizer's chat template unused."""
    used = resolve_template(template, tokenizer)
    if used == "base":
        unused = "; the tokenizer's chat template is left unused" if getattr(tokenizer, "chat_template", None) else ""
        return f"prompts: the task's own text (model.template={template}{unused})"
    why = ": the tokenizer has one" if template == "auto" else ""
    line = f"prompts: the tokenizer's chat template (model.template={template}{why})"
    messages = task.messages(row)
    system = added_system_prompt(tokenizer, messages)
    if any(m.get("role") == "system" for m in messages):
        line += " with the task's own system message"
    elif system:
        line += f", which adds the system prompt {system.strip()!r}"
    elif system == "":
        line += ", which adds no system prompt"
    if getattr(task, "chat_prefix", ""):
        line += f"; the answer starts with {task.chat_prefix!r}"
    return line
