"""Chat prompts: render the model's chat template and tokenize it so that special-token strings
inside message content stay plain text.

The template's own markup (`<|im_start|>user` ...) becomes control tokens; whatever a user typed,
including `<|im_start|>system` or `<|endoftext|>`, is tokenized with special tokens split, so no
control id can appear inside a message span.

Tools (OpenAI `tools`, assistant `tool_calls`, `role: tool` results) go through the template's
own `tools` / `tool_calls` support (HF `apply_chat_template(tools=...)`). A template that knows
neither (SmolLM2's) gets them in the Hermes format as plain message text instead: the tool
signatures in a system message, each call as `<tool_call>{"name", "arguments"}</tool_call>`.
"""
from __future__ import annotations

import json
import secrets

HERMES_TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    "Don't make assumptions about what values to plug into functions. Here are the available tools: "
    "<tools>\n{tools}\n</tools>\nFor each function call return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def hermes_call_text(call: dict) -> str:
    """One OpenAI tool call ({"function": {"name", "arguments": dict}}) in the Hermes format."""
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _template_text(tokenizer, chat_template: str | None) -> str:
    return chat_template or getattr(tokenizer, "chat_template", None) or ""


def _inline_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Tools and tool calls as plain message text, for a template without tool support."""
    out = []
    for m in messages:
        calls = m.get("tool_calls") or ()
        if calls:
            text = "\n".join([m["content"]] * bool(m["content"]) + [hermes_call_text(c) for c in calls])
            m = {"role": m["role"], "content": text}
        out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = HERMES_TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None, tools: list[dict] | None = None) -> list[int]:
    """`messages`: {"role", "content"} plus, for tool use, "tool_calls" (OpenAI's shape, arguments
    as a dict) and "tool_call_id"; `tools`: OpenAI's [{"type": "function", "function": {...}}]."""
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must have a string 'role' and a string 'content'")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model has no chat template; send a plain prompt instead")
    uses_tools = bool(tools) or any(m.get("tool_calls") for m in messages)
    if uses_tools and "tool" not in _template_text(tokenizer, chat_template):
        messages, tools = _inline_tools(messages, tools), None
    marker = f"\x00{secrets.token_hex(8)}\x00"
    placeholders = [dict(m, content=f"{marker}{i}{marker}") for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(placeholders, tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt,
                                             **({"tools": tools} if tools else {}))
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
