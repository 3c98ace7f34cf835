"""What a tool-call parser returns, the registry, and the partial-JSON scanning they share.

A parser reads the whole text generated so far and returns `Parsed`: the content shown to the
user and the calls found. Called again on longer text, the content and each call's arguments only
grow (they are raw spans of the text), which is what lets a stream send them as deltas whose
concatenation equals the final result.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

_WS = " \t\r\n"


class NotToolCall(ValueError):
    """The text is not (or no longer) a tool call in this parser's format."""


@dataclass
class ParsedCall:
    name: str | None  # None until its name is complete
    arguments: str = ""  # raw JSON text of the arguments object so far
    complete: bool = False


@dataclass
class Parsed:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser:
    """Subclasses: `parse(text, final)`. `needs_special_tokens`: its markers are special tokens,
    so the text must keep them (skip_special_tokens off)."""
    name = ""
    needs_special_tokens = False

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError


PARSERS: dict[str, type[ToolParser]] = {}


def register(cls: type[ToolParser]) -> type[ToolParser]:
    PARSERS[cls.name] = cls
    return cls


def get_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(PARSERS))}") from None


def held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may still
    become the marker, so it is not shown yet)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """Index past the JSON string starting at text[i] == '"'; None if it is not closed yet."""
    j, escaped = i + 1, False
    while j < len(text):
        ch = text[j]
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index past the JSON value starting at text[i]; None if it is not complete yet."""
    ch = text[i]
    if ch == '"':
        return _string_end(text, i)
    if ch in "{[":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == '"':
                end = _string_end(text, j)
                if end is None:
                    return None
                j = end
                continue
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(text) and text[j] not in ",}]" + _WS:
        j += 1
    return j if j < len(text) else None


def scan_call(text: str, i: int) -> tuple[ParsedCall, int | None]:
    """The call object {"name": ..., "arguments" | "parameters": {...}} starting at text[i] == '{':
    (what is known so far, index past the object or None while it is incomplete)."""
    call = ParsedCall(None)
    j = i + 1
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return call, None
        if text[j] == "}":
            call.complete = call.name is not None
            if not call.complete:
                raise NotToolCall("a call object without a name")
            call.arguments = call.arguments or "{}"
            return call, j + 1
        if text[j] == ",":
            j += 1
            continue
        if text[j] != '"':
            raise NotToolCall("not a JSON object")
        key_end = _string_end(text, j)
        if key_end is None:
            return call, None
        key = json.loads(text[j:key_end])
        j = skip_ws(text, key_end)
        if j >= len(text):
            return call, None
        if text[j] != ":":
            raise NotToolCall("not a JSON object")
        j = skip_ws(text, j + 1)
        if j >= len(text):
            return call, None
        end = value_end(text, j)
        if key == "name":
            if end is None:
                return call, None
            call.name = _name(text[j:end])
        elif key in ("arguments", "parameters"):
            if text[j] == "{":
                call.arguments = text[j:end] if end is not None else text[j:]
            elif end is not None:
                call.arguments = _arguments_string(text[j:end])
        if end is None:
            return call, None
        j = end


def _name(raw: str) -> str:
    try:
        name = json.loads(raw)
    except ValueError:
        raise NotToolCall("bad function name") from None
    if not isinstance(name, str) or not name:
        raise NotToolCall("the function name must be a string")
    return name


def _arguments_string(raw: str) -> str:
    """Arguments given as a JSON string holding an object (some models do that)."""
    try:
        value = json.loads(raw)
        if isinstance(value, str) and isinstance(json.loads(value), dict):
            return value
    except ValueError:
        pass
    raise NotToolCall("arguments must be a JSON object")


def scan_calls(text: str, i: int, separator: str, closer: str = "") -> tuple[list[ParsedCall], int | None]:
    """Call objects from text[i] on, separated by `separator`, optionally ended by `closer`:
    (the calls, index past the last one / the closer, or None while more may come)."""
    calls: list[ParsedCall] = []
    j = i
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return calls, None
        if text[j] != "{":
            raise NotToolCall("expected a call object")
        call, end = scan_call(text, j)
        calls.append(call)
        if end is None:
            return calls, None
        j = skip_ws(text, end)
        if j >= len(text):
            return calls, None if closer else end
        if closer and text[j] == closer:
            return calls, j + 1
        if text[j] != separator:
            if closer:
                raise NotToolCall(f"expected {separator!r} or {closer!r}")
            return calls, end
        j += 1
