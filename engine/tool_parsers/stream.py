"""Turns a parser's view of the growing text into OpenAI `delta.content` / `delta.tool_calls`."""
from __future__ import annotations

import secrets

from engine.tool_parsers.base import Parsed, ToolParser


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_calls_json(parsed: Parsed) -> list[dict]:
    """OpenAI `message.tool_calls` of a finished output."""
    return [{"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.calls if c.name is not None]


class ToolCallStream:
    """feed(text_delta) -> (content delta, tool_call deltas); finish() flushes what was held back.
    Each call's first delta carries its id and name; later ones append to its arguments."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.args_sent: list[int] = []
        self.ids: list[str] = []

    @property
    def num_calls(self) -> int:
        return len(self.args_sent)

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        return self._diff(self.parser.parse(self.text, final=False))

    def finish(self) -> tuple[str, list[dict]]:
        return self._diff(self.parser.parse(self.text, final=True))

    def _diff(self, parsed: Parsed) -> tuple[str, list[dict]]:
        content = parsed.content[self.content_sent:] if len(parsed.content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(parsed.content))
        deltas = []
        for i, call in enumerate(parsed.calls):
            if call.name is None:
                break
            if i == len(self.args_sent):
                self.ids.append(call_id())
                self.args_sent.append(0)
                deltas.append({"index": i, "id": self.ids[i], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            new = call.arguments[self.args_sent[i]:]
            if new:
                self.args_sent[i] = len(call.arguments)
                deltas.append({"index": i, "function": {"arguments": new}})
        return content, deltas
