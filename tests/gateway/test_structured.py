"""Structured outputs and strict request checking through the HTTP gateway and the gRPC API, on a
real disaggregated stack (tests/gateway/conftest.py): the OpenAI SDK's parse(), json_schema
(validated with jsonschema), regex, choice, grammar, vLLM's structured_outputs and guided_*;
every field we do not implement is a 400 naming it."""
from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import grpc
import jsonschema
import pytest
from pydantic import BaseModel, Field

from protos.pdserve.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(600)

CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
SHORT = {"type": "string", "maxLength": 6}
SCHEMAS = [
    {"type": "object", "properties": {"name": SHORT}, "required": ["name"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                         "maximum": 999}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                                               "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 50}, "nick": SHORT},
        "required": ["id", "nick"], "additionalProperties": False}}, "required": ["user"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"const": "point"}, "xy": {
        "type": "array", "items": {"type": "number", "minimum": -10, "maximum": 10}, "minItems": 2,
        "maxItems": 2}}, "required": ["kind", "xy"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"enum": ["none"]}]}}, "required": ["value"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}, "level": {"enum": [1, 2, 3]}},
     "required": ["items", "level"], "additionalProperties": False},
]


class Person(BaseModel):
    name: Annotated[str, Field(max_length=8)]
    age: Annotated[int, Field(ge=0, le=120)]
    role: Literal["admin", "user"]


def test_sdk_parse_returns_a_pydantic_object(stack_sdk, stack_model):
    reply = stack_sdk.chat.completions.parse(model=stack_model, messages=CHAT, response_format=Person,
                                             max_tokens=120, temperature=0)
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and reply.choices[0].finish_reason == "stop"
    assert 0 <= person.age <= 120 and person.role in ("admin", "user")


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_output_validates(stack_http, stack_model, index):
    schema = SCHEMAS[index]
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema, "strict": True}}
    body = {"model": stack_model, "messages": CHAT, "max_tokens": 150, "temperature": 0.9, "seed": index,
            "response_format": fmt}
    reply = stack_http.post("/v1/chat/completions", json=body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_and_streaming_json_schema(stack_http, stack_sdk, stack_model):
    reply = stack_http.post("/v1/chat/completions", json={
        "model": stack_model, "messages": CHAT, "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object"}}).json()
    text = reply["choices"][0]["message"]["content"]
    if reply["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")
    schema = SCHEMAS[9]
    fmt = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema}}
    chunks = list(stack_sdk.chat.completions.create(model=stack_model, messages=CHAT, max_tokens=150,
                                                    temperature=0, response_format=fmt, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(streamed), schema)
    full = stack_sdk.chat.completions.create(model=stack_model, messages=CHAT, max_tokens=150, temperature=0,
                                             response_format=fmt)
    assert full.choices[0].message.content == streamed


def test_completions_regex_choice_grammar(stack_sdk, stack_model):
    def complete(**extra):
        reply = stack_sdk.completions.create(model=stack_model, prompt="Answer:", max_tokens=40,
                                             temperature=1.0, seed=5, extra_body=extra)
        return reply.choices[0]

    c = complete(structured_outputs={"regex": r"[0-9]{3}-[a-z]{3}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{3}", c.text) and c.finish_reason == "stop"
    c = complete(structured_outputs={"choice": ["positive", "negative", "neutral"]})
    assert c.text in ("positive", "negative", "neutral")
    c = complete(guided_choice=["yes", "no"])
    assert c.text in ("yes", "no")
    c = complete(guided_regex=r"(cat|dog)s?")
    assert re.fullmatch(r"(cat|dog)s?", c.text)
    c = complete(structured_outputs={"grammar": 'root ::= "[" item ("," item)* "]"\nitem ::= [a-c]'})
    assert re.fullmatch(r"\[[a-c](,[a-c])*\]", c.text) or c.finish_reason == "length"
    c = complete(guided_json={"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"]})
    assert json.loads(c.text)["k"] in (1, 2)


def test_grpc_structured_field(structured_stack):
    stub = structured_stack.stub()
    reply = stub.Generate(pb.GenerateRequest(
        text="Pick:", structured=pb.StructuredOutput(choice=pb.ChoiceList(choices=["left", "right"])),
        stopping=pb.StoppingCriteria(max_new_tokens=10)), timeout=120)
    assert reply.completions[0].text in ("left", "right")
    chunks = list(stub.GenerateStream(pb.GenerateRequest(
        text="Code:", structured=pb.StructuredOutput(regex="[A-Z]{4}"), stopping=pb.StoppingCriteria(max_new_tokens=10)),
        timeout=120))
    assert re.fullmatch("[A-Z]{4}", "".join(c.text for c in chunks))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(text="x", structured=pb.StructuredOutput(regex="(a")), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex" in err.value.details()


# -- refusals ------------------------------------------------------------------------------------

BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ("/v1/completions", {"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
    ("/v1/completions", {"stream": True, "guided_regex": "(ab"}, "guided_regex"),  # the router's parse, streamed
    ("/v1/chat/completions", {"stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "bogus"}}}], "tool_choice": "required"}, "tool_choice"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ("/v1/completions", {"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ("/v1/completions", {"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"stream": True, "stream_options": {"include_usage": True, "extra": 1}},
     "stream_options.extra"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"modalities": ["audio"]}, "modalities"),
    ("/v1/chat/completions", {"audio": {"voice": "x"}}, "audio"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "refusal": "x"}]},
     "messages.0.refusal"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
]


@pytest.mark.parametrize("path, extra, param", BAD, ids=[b[2] for b in BAD])
def test_unsupported_or_bad_fields_are_400_naming_them(stack_http, stack_model, path, extra, param):
    body = {"model": stack_model, "max_tokens": 4}
    body.update({"messages": CHAT} if "chat" in path else {"prompt": "hi"})
    body.update(extra)
    r = stack_http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split(".")[0] in err["message"]


def test_ignored_fields_are_accepted(stack_http, stack_model):
    r = stack_http.post("/v1/chat/completions", json={
        "model": stack_model, "messages": CHAT, "max_tokens": 2, "user": "u1", "metadata": {"k": "v"},
        "store": False, "service_tier": "auto", "best_of": 1, "guided_decoding_backend": "xgrammar"})
    assert r.status_code == 200, r.text


def test_model_by_id_and_request_id_header(stack_http, stack_model):
    card = stack_http.get(f"/v1/models/{stack_model}")
    assert card.status_code == 200 and card.json()["id"] == stack_model
    missing = stack_http.get("/v1/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    r = stack_http.post("/v1/completions", json={"model": stack_model, "prompt": "hi", "max_tokens": 2},
                        headers={"X-Request-Id": "client-label-7"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-label-7"


def test_continuous_usage_stats(stack_http, stack_model):
    with stack_http.stream("POST", "/v1/completions", json={
            "model": stack_model, "prompt": "hi", "max_tokens": 3, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    token_chunks = [e for e in events if e["choices"]]
    assert [e["usage"]["completion_tokens"] for e in token_chunks] == [1, 2, 3]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
