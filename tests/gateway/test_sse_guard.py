"""gateway/sse_guard.py in process (no model, no sockets): SSEGuard.end_all() ends an open stream with
an error event and [DONE] and closes its body generator (which is what cancels the gRPC calls); a
write that stays blocked past the stall timeout gives the stream up and closes the body too."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.sse_guard import GuardedStreamingResponse, SSEGuard, backlog_bytes


class _Body:
    """An endless SSE body that records whether it was closed (the gRPC calls' cancel point)."""

    def __init__(self):
        self.closed = False
        self.sent = 0

    async def gen(self):
        try:
            while True:
                await asyncio.sleep(0.01)
                self.sent += 1
                yield b'data: {"n": %d}\n\n' % self.sent
        finally:
            self.closed = True


async def _receive_nothing():
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def test_end_all_sends_an_error_event_and_done_then_completes_the_response():
    async def main():
        guard, body, messages = SSEGuard(stall_timeout_s=5.0), _Body(), []

        async def send(message):
            messages.append(message)

        response = GuardedStreamingResponse(body.gen(), guard, media_type="text/event-stream")
        task = asyncio.ensure_future(response({"type": "http", "asgi": {"spec_version": "2.3"}}, _receive_nothing, send))
        while body.sent < 5:
            await asyncio.sleep(0.01)
        assert len(guard.streams) == 1
        assert guard.end_all("the server is shutting down; retry the request") == 1
        await asyncio.wait_for(task, 5)
        return guard, body, messages

    guard, body, messages = asyncio.run(main())
    chunks = [m["body"] for m in messages if m["type"] == "http.response.body"]
    assert chunks[-1] == b"" and messages[-1]["more_body"] is False  # a complete response, not a cut one
    assert chunks[-2] == b"data: [DONE]\n\n"
    error = json.loads(chunks[-3][len(b"data: "):])
    assert error["error"]["code"] == "server_shutting_down" and "shutting down" in error["error"]["message"]
    assert body.closed and guard.ended_by_shutdown == 1 and not guard.streams


def test_a_write_blocked_past_the_stall_timeout_gives_the_stream_up():
    async def main():
        guard, body = SSEGuard(stall_timeout_s=0.5), _Body()
        writes = 0

        async def send(message):
            nonlocal writes
            writes += 1
            if message["type"] == "http.response.body" and writes > 3:
                await asyncio.sleep(3600)  # the client stopped reading: the transport never drains

        response = GuardedStreamingResponse(body.gen(), guard, media_type="text/event-stream")
        start = time.monotonic()
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, _receive_nothing, send), 10)
        return guard, body, time.monotonic() - start

    guard, body, took = asyncio.run(main())
    assert guard.slow_readers_aborted == 1 and body.closed
    assert 0.5 <= took < 3.0


def test_backlog_of_a_missing_transport_is_zero():
    assert backlog_bytes(None) == 0


@pytest.mark.parametrize("stall", [0.3])
def test_a_slow_but_steady_reader_is_not_given_up(stall):
    """Each write blocks a while, but never as long as the stall timeout: the stream completes."""
    async def main():
        guard, messages = SSEGuard(stall_timeout_s=stall), []

        async def body():
            for i in range(10):
                yield b"data: %d\n\n" % i

        async def send(message):
            await asyncio.sleep(stall / 3)
            messages.append(message)

        response = GuardedStreamingResponse(body(), guard, media_type="text/event-stream")
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, _receive_nothing, send), 10)
        return guard, messages

    guard, messages = asyncio.run(main())
    assert guard.slow_readers_aborted == 0
    assert sum(1 for m in messages if m.get("body", b"").startswith(b"data: ")) == 10
    assert messages[-1]["more_body"] is False
