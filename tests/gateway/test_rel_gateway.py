"""Issue 14 F8 on the HTTP side, in process (no model): Retry-After on 503/429, header count and
size limits, a body-read timeout, and CANCELLED from upstream not taken for a client disconnect."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from starlette.requests import Request
from starlette.testclient import TestClient

from gateway.app import MAX_HEADERS, RETRY_AFTER_S, ClientGone, Settings, create_app, read_json
from gateway.errors import APIError, from_grpc
from gateway.router_client import RouterClient
from protos.pdserve.v1 import generation_pb2 as pb
from tests.services.stack import free_port

BODY = {"model": "m", "prompt": "hi", "max_tokens": 4}


@pytest.fixture()
def client():
    """A gateway whose router is not there: every generation call fails with UNAVAILABLE."""
    settings = Settings(router=f"127.0.0.1:{free_port()}", request_timeout_s=5.0, body_timeout_s=0.5)
    info = pb.ModelInfoResponse(model="m", max_model_len=256, vocab_size=49152)

    async def connected():
        return RouterClient(settings.router, timeout_s=5.0), info

    app = create_app(settings, connected=None)
    app.router.lifespan_context = _lifespan_with(app.router.lifespan_context, connected)
    with TestClient(app) as c:
        yield c


def _lifespan_with(original, make):
    """The app's own lifespan, fed a client made on the test's event loop."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import gateway.app as gw

        real = gw.connect

        async def fake_connect(settings, wait_s=60.0):
            return await make()
        gw.connect = fake_connect
        try:
            async with original(app):
                yield
        finally:
            gw.connect = real
    return lifespan


def test_unavailable_router_is_503_with_retry_after(client):
    reply = client.post("/v1/completions", json=BODY)
    assert reply.status_code == 503, reply.text
    assert reply.headers["retry-after"] == str(RETRY_AFTER_S)
    assert "Traceback" not in reply.text


def test_too_many_or_too_large_headers_are_431(client):
    many = {f"x-h{i}": "v" for i in range(MAX_HEADERS + 1)}
    assert client.post("/v1/completions", json=BODY, headers=many).status_code == 431
    huge = {"x-big": "v" * 40_000}
    assert client.post("/v1/completions", json=BODY, headers=huge).status_code == 431


def _request(*messages, stall: bool = False) -> Request:
    """A request whose body arrives as `messages`, then stalls forever (or ends)."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600 if stall else 0)
        return {"type": "http.disconnect"}
    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)


def test_stalled_body_times_out_with_408():
    settings = Settings(router="unused", body_timeout_s=0.3)
    part = {"type": "http.request", "body": b'{"model": "m", ', "more_body": True}
    start = time.monotonic()
    with pytest.raises(APIError) as err:
        asyncio.run(read_json(_request(part, stall=True), settings))
    assert err.value.status == 408 and "did not arrive" in err.value.message
    assert time.monotonic() - start < 3.0


def test_client_gone_mid_upload_is_a_quiet_499():
    part = {"type": "http.request", "body": b'{"model": "m", ', "more_body": True}
    with pytest.raises(ClientGone):  # handled as 499 without an ERROR log, not as an internal error
        asyncio.run(read_json(_request(part, {"type": "http.disconnect"}), Settings(router="unused")))


def test_cancelled_upstream_is_503_not_499():
    err = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="the node cancelled the request")
    assert from_grpc(err).status == 503
