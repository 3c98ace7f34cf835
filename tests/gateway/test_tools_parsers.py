"""Tool-call parsers and their streaming: every format, split at every character, gives deltas
whose concatenation equals the whole-text parse; the gateway's tool_choice rules."""
from __future__ import annotations

import json

import pytest

from engine.tool_parsers import (NamedFunctionOutput, RequiredOutput, ToolCallStream, get_parser,
                                 tool_calls_json)
from gateway import protocol as P
from gateway.errors import APIError

CASES = {
    "hermes": ('I will check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris", '
               '"days": [1, {"x": "}"}]}}\n</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>',
               "I will check. ", [("get_weather", {"city": 'Pa"ris', "days": [1, {"x": "}"}]}), ("now", {})]),
    "llama3_json": ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                    '{"name": "now", "parameters": {}}', "", [("get_weather", {"city": "Oslo"}), ("now", {})]),
    "mistral": ('Sure[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, '
                '{"name": "now", "arguments": "{}"}]', "Sure", [("get_weather", {"city": "Rome"}), ("now", {})]),
    "pythonic": ('[get_weather(city="Lima", days=3), now()]', "",
                 [("get_weather", {"city": "Lima", "days": 3}), ("now", {})]),
}


def _stream(parser, text: str, step: int = 1):
    stream = ToolCallStream(parser)
    pieces = [stream.feed(text[i:i + step]) for i in range(0, len(text), step)] + [stream.finish()]
    content = "".join(c for c, _ in pieces)
    calls: dict[int, dict] = {}
    for _, deltas in pieces:
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": None, "arguments": "", "ids": []})
            if "id" in d:
                call["ids"].append(d["id"])
                call["name"] = d["function"]["name"]
            call["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_text_parse(name):
    text, content, calls = CASES[name]
    parsed = get_parser(name).parse(text, final=True)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    out = tool_calls_json(parsed)
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in out)


@pytest.mark.parametrize("step", [1, 3, 7])
@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_deltas_concatenate_to_the_whole_parse(name, step):
    text, _, _ = CASES[name]
    parser = get_parser(name)
    whole = parser.parse(text, final=True)
    content, calls = _stream(parser, text, step)
    assert content == whole.content
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in whole.calls]
    assert all(len(c["ids"]) == 1 for c in calls)  # id and name once, in the call's first delta


@pytest.mark.parametrize("name", sorted(CASES))
def test_plain_text_stays_content(name):
    text = "The weather is nice; <tool is a word> [maybe]."
    parser = get_parser(name)
    assert parser.parse(text, final=True).content == text and not parser.parse(text, final=True).calls
    assert _stream(parser, text) == (text, [])


def test_hermes_holds_back_a_partial_marker_only_while_it_may_complete():
    parser = get_parser("hermes")
    assert parser.parse("Hello <tool_", final=False).content == "Hello "
    assert parser.parse("Hello <tool_", final=True).content == "Hello <tool_"
    assert parser.parse("Hello <tox", final=False).content == "Hello <tox"


def test_hermes_arguments_stream_before_the_call_completes():
    stream = ToolCallStream(get_parser("hermes"))
    _, deltas = stream.feed('<tool_call>{"name": "f", "arguments": {"a": "lo')
    assert deltas[0]["function"] == {"name": "f", "arguments": ""}
    assert deltas[1]["function"]["arguments"] == '{"a": "lo'


def test_forced_outputs_parse():
    named = NamedFunctionOutput("f")
    content, calls = _stream(named, '{"x": 1}')
    assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("f", '{"x": 1}')]
    required = RequiredOutput()
    text = '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]'
    assert [(c.name, c.arguments) for c in required.parse(text, final=True).calls] == [("f", '{"x": 1}'), ("g", "{}")]
    assert [(c["name"], c["arguments"]) for c in _stream(required, text, 2)[1]] == [("f", '{"x": 1}'), ("g", "{}")]


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_parser("nope")


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def _plan(parser, **body):
    req = P.parse(P.ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], **body})
    return P.tool_plan(req, parser)


def test_tool_choice_rules():
    assert _plan(None).parser is None and _plan(None, tool_choice="none").tools == ()
    with pytest.raises(APIError, match="needs a server started with --tool-call-parser"):
        _plan(None, tools=TOOLS)
    assert _plan("hermes", tools=TOOLS).parser.name == "hermes"
    assert _plan(None, tools=TOOLS, tool_choice="none").parser is None
    required = _plan(None, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(required.structured.json_schema)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    named = _plan(None, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "f"}})
    assert named.named and json.loads(named.structured.json_schema) == {"type": "object"}
    with pytest.raises(APIError, match="not in tools"):
        _plan(None, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(APIError, match="needs tools"):
        _plan(None, tool_choice="required")
