"""Chat prompts: render the model's chat template and tokenize it so that special-token strings
inside message content stay plain text.

The template's own markup (`<|im_start|>user` ...) becomes control tokens; whatever a user typed,
including `<|im_start|>system` or `<|endoftext|>`, is tokenized with special tokens split, so no
control id can appear inside a message span.
"""
from __future__ import annotations

import secrets


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None) -> list[int]:
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must have a string 'role' and a string 'content'")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model has no chat template; send a plain prompt instead")
    marker = f"\x00{secrets.token_hex(8)}\x00"
    placeholders = [dict(m, content=f"{marker}{i}{marker}") for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(placeholders, tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    parts = rendered.split(marker)
    # parts alternate: template text, message index, template text, ...
    for j, part in enumerate(parts):
        if j % 2 == 0:
            if part:
                ids.extend(tokenizer.encode(part, add_special_tokens=False))
        else:
            content = messages[int(part)]["content"]
            if content:
                ids.extend(tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True))
    return ids
