"""The tool-call formats: hermes, llama3_json, mistral, pythonic, and the two the server forces
with a grammar (`tool_choice` a named function: the output is its arguments; `required`: a JSON
array of {"name", "parameters"})."""
from __future__ import annotations

import ast
import json

from engine.tool_parsers.base import (NotToolCall, Parsed, ParsedCall, ToolParser, held_back, register,
                                      scan_call, scan_calls, skip_ws)


@register
class HermesParser(ToolParser):
    """`text <tool_call>{"name": ..., "arguments": {...}}</tool_call> <tool_call>...`"""
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        start = text.find(self.START)
        if start < 0:
            return Parsed(text if final else text[:len(text) - held_back(text, self.START)])
        out = Parsed(text[:start])
        i = start
        while i >= 0:
            j = skip_ws(text, i + len(self.START))
            if j >= len(text):
                break
            try:
                if text[j] != "{":
                    raise NotToolCall("expected a call object")
                call, end = scan_call(text, j)
            except NotToolCall:
                break
            out.calls.append(call)
            if end is None:
                break
            i = text.find(self.START, end)
        return out


@register
class Llama3JsonParser(ToolParser):
    """`<|python_tag|>{"name": ..., "parameters": {...}}; {...}` (the whole output, or content)."""
    name = "llama3_json"
    needs_special_tokens = True
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        body = text.lstrip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG):].lstrip()
        elif not final and self.TAG.startswith(body):
            return Parsed("")
        if not body.startswith("{"):
            return Parsed(text if final or body else "")
        try:
            calls, _ = scan_calls(body, 0, ";")
        except NotToolCall:
            return Parsed(text if final else "")
        return _named_calls(calls, text, final)


@register
class MistralParser(ToolParser):
    """`text[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`"""
    name = "mistral"
    needs_special_tokens = True
    MARKER = "[TOOL_CALLS]"

    def parse(self, text: str, final: bool) -> Parsed:
        start = text.find(self.MARKER)
        if start < 0:
            return Parsed(text if final else text[:len(text) - held_back(text, self.MARKER)])
        j = skip_ws(text, start + len(self.MARKER))
        if j >= len(text):
            return Parsed(text[:start])
        try:
            calls, _ = (scan_calls(text, j + 1, ",", "]") if text[j] == "[" else scan_calls(text, j, ","))
        except NotToolCall:
            return Parsed(text if final else text[:start])
        return Parsed(text[:start], [c for c in calls if c.name is not None])


@register
class PythonicParser(ToolParser):
    """`[get_weather(city="Paris"), other(x=1)]` (the whole output), arguments as literals.
    Calls are only known once the list is complete, so they stream in one piece."""
    name = "pythonic"

    def parse(self, text: str, final: bool) -> Parsed:
        body = text.strip()
        if not body.startswith("["):
            return Parsed(text if final or body else "")
        try:
            calls = _python_calls(body)
        except (SyntaxError, ValueError):
            return Parsed(text if final else "")
        return Parsed("", calls)


def _python_calls(body: str) -> list[ParsedCall]:
    tree = ast.parse(body, mode="eval").body
    if not isinstance(tree, ast.List) or not all(isinstance(e, ast.Call) for e in tree.elts):
        raise ValueError("not a list of calls")
    calls = []
    for e in tree.elts:
        if not isinstance(e.func, ast.Name) or e.args:
            raise ValueError("calls take keyword arguments only")
        args = {kw.arg: ast.literal_eval(kw.value) for kw in e.keywords}
        calls.append(ParsedCall(e.func.id, json.dumps(args, ensure_ascii=False), True))
    return calls


def _named_calls(calls: list[ParsedCall], text: str, final: bool) -> Parsed:
    named = [c for c in calls if c.name is not None]
    if final and not named:
        return Parsed(text)
    return Parsed("", named)


class NamedFunctionOutput(ToolParser):
    """tool_choice names a function: the grammar makes the whole output its arguments."""
    name = "named"

    def __init__(self, function: str):
        self.function = function

    def parse(self, text: str, final: bool) -> Parsed:
        return Parsed("", [ParsedCall(self.function, text, final)])


class RequiredOutput(ToolParser):
    """tool_choice required: the grammar makes the output `[{"name": ..., "parameters": {...}}, ...]`."""
    name = "required"

    def parse(self, text: str, final: bool) -> Parsed:
        j = skip_ws(text, 0)
        if j >= len(text):
            return Parsed("")
        if text[j] != "[":
            return Parsed(text if final else "")
        try:
            calls, _ = scan_calls(text, j + 1, ",", "]")
        except NotToolCall:
            return Parsed(text if final else "")
        return Parsed("", [c for c in calls if c.name is not None])
