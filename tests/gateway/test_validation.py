"""Validate once (issue 10 item 2), in process: the gateway writes the client's sampling values into
the GenerateRequest unchecked but for the wire, and the router's refusal is the 400. The bad-input
table of test_gateway.py goes through a real gateway app whose router is the router's own
validation (`PromptBuilder.build`, exceptions mapped by the servicers' `status_for`)."""
from __future__ import annotations

import grpc
import pytest
from starlette.testclient import TestClient

from engine.rpc.server import status_for
from gateway.app import Settings, create_app
from protos.pdserve.v1 import generation_pb2 as pb
from router.prompts import ModelLimits, PromptBuilder
from tests.gateway.test_gateway import BAD, CH, CHAT, C

INFO = pb.ModelInfoResponse(model="m", max_model_len=256, vocab_size=49152)


class ValidatingRouter:
    """Stands for the router's Generation service up to its first node call: each GenerateRequest
    is validated as the router does; one that passes gets an empty reply (and is kept)."""

    def __init__(self, builder: PromptBuilder):
        self.builder, self.accepted = builder, []

    def _check(self, request: pb.GenerateRequest) -> None:
        try:
            self.builder.build(request)
        except Exception as exc:  # noqa: BLE001 - as the router's error interceptor
            code, message = status_for(exc)
            raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=message) from None
        self.accepted.append(request)

    async def generate(self, request):
        self._check(request)
        return pb.GenerateResponse()

    def generate_stream(self, request):
        router = self

        class Call:
            async def read(self):
                router._check(request)
                return grpc.aio.EOF

            def cancel(self):
                pass
        return Call()

    async def token_strings(self, ids):
        return {}

    async def close(self):
        pass


@pytest.fixture(scope="module")
def router(default_tokenizer):
    return ValidatingRouter(PromptBuilder(default_tokenizer, ModelLimits(INFO.vocab_size, INFO.max_model_len)))


@pytest.fixture(scope="module")
def http(router):
    with TestClient(create_app(Settings(router="unused"), connected=(router, INFO))) as client:
        yield client


@pytest.mark.parametrize("route, body, status, message, param", BAD, ids=[str(row[1])[:60] for row in BAD])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_is_refused_naming_the_field(http, router, route, body, status, message, param, stream):
    if stream and (route not in (C, CH) or "stream" in body or "stream_options" in body):
        pytest.skip("the row is about streaming itself, or its route does not stream")
    accepted = len(router.accepted)
    r = http.post(route, json={"model": "m", **({"stream": True} if stream else {}), **body})
    err = r.json()["error"]
    assert (r.status_code, err["param"]) == (status, param), err
    assert message in err["message"]
    assert len(router.accepted) == accepted  # refused by the gateway or by the router, never passed


def test_only_given_values_are_written_and_defaults_stay_the_routers(http, router):
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": CHAT, "temperature": 0.5,
                                                "stop": "x", "top_k": -1, "logit_bias": {"7": 1.5}})
    assert r.status_code == 200, r.text
    sent = router.accepted[-1]
    assert [f.name for f, _ in sent.sampling.ListFields()] == ["temperature", "top_k", "logit_bias"]
    assert sent.sampling.top_k == 0 and dict(sent.sampling.logit_bias) == {7: 1.5}  # -1 and 0 both mean off
    assert list(sent.stopping.stop) == ["x"] and not sent.stopping.HasField("max_new_tokens")
    assert not sent.HasField("logprobs") and sent.n == 1
    params = router.builder.params(sent)
    assert params.top_p == 1.0 and params.stop == ["x"] and params.max_tokens is None
