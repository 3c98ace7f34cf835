"""The same structured-output and tool calls through LiteLLM's `hosted_vllm/` provider (what LiteLLM
users point at a vLLM-compatible server), on the shared stack of tests/gateway/conftest.py."""
from __future__ import annotations

import json
import os

import jsonschema
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the cost map at import
litellm = pytest.importorskip("litellm")

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # importing litellm alone takes seconds to minutes

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "forecast", "description": "Weather forecast",
                                           "parameters": SCHEMA}}]
ASK = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]


def _call(structured_stack, stack_model, **kw):
    return litellm.completion(model=f"hosted_vllm/{stack_model}", api_base=structured_stack.gateway_url + "/v1",
                              api_key="unused", messages=ASK, max_tokens=80, temperature=0, **kw)


def test_litellm_json_schema(structured_stack, stack_model):
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}
    reply = _call(structured_stack, stack_model, response_format=fmt)
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_litellm_forced_tool_call_streaming_and_not(structured_stack, stack_model):
    choice = {"type": "function", "function": {"name": "forecast"}}
    reply = _call(structured_stack, stack_model, tools=TOOLS, tool_choice=choice)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "forecast"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    arguments = ""
    for chunk in _call(structured_stack, stack_model, tools=TOOLS, tool_choice=choice, stream=True):
        for d in chunk.choices[0].delta.tool_calls or ():
            arguments += d.function.arguments or ""
    assert arguments == call.function.arguments
