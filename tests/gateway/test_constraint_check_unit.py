"""The gateway checks an output constraint's shape on its event loop but leaves the grammar parse
(xgrammar, seconds for some schemas) to the router's checker processes; the router's refusal comes
back as a 400 naming the request field (the stack tests in test_structured.py cover it end to end)."""
from __future__ import annotations

import pytest

from engine.structured.spec import StructuredSpec
from gateway import protocol as P
from gateway.errors import APIError
from protos.pdserve.v1 import generation_pb2 as pb


def test_no_grammar_is_parsed_in_the_gateway(monkeypatch):
    def parse(self):
        raise AssertionError("the gateway parsed a grammar on its event loop")

    monkeypatch.setattr(StructuredSpec, "grammar", parse)
    for msg in (pb.StructuredOutput(regex="(ab"), pb.StructuredOutput(grammar='root ::= "a"'),
                pb.StructuredOutput(json_schema='{"type": "object"}'), pb.StructuredOutput(json_object=True)):
        P.check_structured("structured_outputs", msg)  # nothing raised, nothing parsed


@pytest.mark.parametrize("schema, words", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_a_schema_that_is_not_a_json_object_is_refused_here(schema, words):
    with pytest.raises(APIError) as info:
        P.check_structured("response_format", pb.StructuredOutput(json_schema=schema))
    assert info.value.status == 400 and info.value.param == "response_format"
    assert info.value.message.startswith("response_format: ") and words in info.value.message


def test_the_routers_grammar_refusal_names_the_field():
    refused = APIError(400, "invalid structured regex: unmatched '(' at 0", code="invalid_argument")
    named = P.constraint_refusal(refused, "structured_outputs.regex")
    assert (named.status, named.param, named.code) == (400, "structured_outputs.regex", "invalid_argument")
    assert named.message == "structured_outputs.regex: invalid structured regex: unmatched '(' at 0"
    slow = P.constraint_refusal(APIError(400, "structured json_schema took more than 10 s to parse"), "tool_choice")
    assert slow.param == "tool_choice"
    for other, field in ((APIError(400, "temperature must be >= 0, got -1.0", param="temperature"), "x"),
                         (APIError(429, "structured queue full"), "x"),
                         (APIError(400, "invalid structured regex: x"), None)):
        assert P.constraint_refusal(other, field) is other
