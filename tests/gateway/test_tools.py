"""Tool calling through the gateway on a real stack (tests/gateway/conftest.py, hermes parser):
forced (named) and required calls return valid tool_calls, streaming and not, the streamed
argument deltas concatenate to the non-streamed arguments, and a tool round trip renders."""
from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.timeout(600)

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _create(sdk, model, **kw):
    return sdk.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=120,
                                       temperature=0, **kw)


def _streamed_calls(chunks) -> tuple[dict[int, dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for d in choice.delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] is None, "id sent twice"
                call["id"], call["name"] = d.id, d.function.name
            call["arguments"] += d.function.arguments or ""
    return calls, finish


def test_named_tool_choice_streaming_and_not(stack_sdk, stack_model):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    full = _create(stack_sdk, stack_model, tool_choice=choice)
    message = full.choices[0].message
    assert full.choices[0].finish_reason == "stop" and message.content is None
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls, finish = _streamed_calls(_create(stack_sdk, stack_model, tool_choice=choice, stream=True))
    assert finish == "stop" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == call.function.arguments


@pytest.mark.parametrize("parallel", [False, True])
def test_required_tool_choice_streaming_and_not(stack_sdk, stack_model, parallel):
    full = _create(stack_sdk, stack_model, tool_choice="required", parallel_tool_calls=parallel)
    assert full.choices[0].finish_reason == "tool_calls", full.choices[0]
    got = full.choices[0].message.tool_calls
    assert got and (parallel or len(got) == 1)
    for call in got:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    calls, finish = _streamed_calls(_create(stack_sdk, stack_model, tool_choice="required",
                                            parallel_tool_calls=parallel, stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in got]


def test_auto_tool_choice_returns_content_or_calls(stack_sdk, stack_model):
    full = _create(stack_sdk, stack_model, tool_choice="auto", max_completion_tokens=16)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content is not None or choice.message.tool_calls


def test_tools_reach_the_prompt(stack_http, stack_model):
    def prompt_tokens(**extra):
        r = stack_http.post("/v1/chat/completions", json={"model": stack_model, "messages": ASK, "max_tokens": 1,
                                                          **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens(tools=TOOLS, tool_choice="none") > prompt_tokens() + 50


def test_tool_round_trip_renders(stack_http, stack_model):
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    rendered = stack_http.post("/tokenize", json={"model": stack_model, "messages": history})
    assert rendered.status_code == 200, rendered.text
    text = "".join(rendered.json()["token_strs"]).replace("Ġ", " ").replace("Ċ", "\n")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<|im_start|>tool\n21 degrees and sunny<|im_end|>" in text
    reply = stack_http.post("/v1/chat/completions", json={"model": stack_model, "messages": history, "tools": TOOLS,
                                                          "tool_choice": "none", "max_tokens": 4})
    assert reply.status_code == 200, reply.text


def test_bad_tool_messages_are_400(stack_http, stack_model):
    bad_args = ASK + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    r = stack_http.post("/v1/chat/completions", json={"model": stack_model, "messages": bad_args})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"
    r = stack_http.post("/v1/chat/completions", json={
        "model": stack_model, "messages": ASK, "tools": TOOLS, "tool_choice": "required",
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
