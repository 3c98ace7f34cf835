"""Bounded SSE streams: a slow-reader watchdog and a clean end on shutdown.

Slow readers (issue 14 F7). A client that stops reading fills, in turn, its own receive buffer,
our kernel send buffer and the transport's write buffer; uvicorn's `send` then blocks. A stream's
*backlog* is what it wrote that the client has not taken yet: the transport's write buffer plus
the socket's send queue (`SIOCOUTQ`: bytes not yet acknowledged by the peer, Linux). When the
backlog stays at or above `max_backlog_bytes` (or one write stays blocked) for `stall_timeout_s`
seconds, the stream is given up: the body generator is closed (which cancels the gRPC calls, so
the router and the decode node free the request) and the connection is aborted (a reset, not a
close that would wait forever for the buffer to drain).

Shutdown (issue 14 item 7). `SSEGuard.end_all()` ends every open stream with a final
`data: {"error": ...}` event and `data: [DONE]` instead of a cut connection; `gateway/__main__.py`
calls it when the shutdown grace period is over.

`TransportScope` (the outermost ASGI layer, see gateway/__main__.py) puts uvicorn's transport in
the scope, so a stream can measure its socket and abort it; without it (in-process test clients)
only a blocked write counts as a stall and a given-up stream simply ends.
"""
from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import termios
import time
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from gateway import responses as R
from gateway.errors import APIError

logger = logging.getLogger("pdserve.gateway")

TRANSPORT_KEY = "pdserve.transport"
STALL_TIMEOUT_S = 30.0
MAX_BACKLOG_BYTES = 1 << 20  # 1 MiB unread by the client: thousands of chunks
POLL_S = 0.25  # how often a blocked write looks at the clock


class TransportScope:
    """Outermost ASGI layer: `scope["pdserve.transport"]` = the connection's asyncio transport
    (uvicorn's `send` is a bound method of its request cycle, which holds the transport)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                scope[TRANSPORT_KEY] = transport
        await self.app(scope, receive, send)


def backlog_bytes(transport) -> int:
    """Bytes written to `transport` that the peer has not acknowledged (write buffer + SIOCOUTQ)."""
    if transport is None:
        return 0
    total = 0
    try:
        total += transport.get_write_buffer_size()
    except (AttributeError, RuntimeError):
        pass
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            buf = array.array("i", [0])
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)  # == SIOCOUTQ on sockets
            total += buf[0]
        except (OSError, ValueError, AttributeError):
            pass
    return total


@dataclass
class SSEGuard:
    """The gateway's open SSE streams and their limits (one per app: `app.state.sse`)."""

    stall_timeout_s: float = STALL_TIMEOUT_S
    max_backlog_bytes: int = MAX_BACKLOG_BYTES
    streams: set = field(default_factory=set)
    slow_readers_aborted: int = 0  # counters, for logs and tests
    ended_by_shutdown: int = 0
    closing: bool = False

    def end_all(self, message: str = "the server is shutting down; retry the request") -> int:
        """Ends every open stream with an error event and [DONE] (after the shutdown grace)."""
        self.closing = True
        streams = list(self.streams)
        for s in streams:
            s.end(message)
        return len(streams)


class GuardedStreamingResponse(StreamingResponse):
    """StreamingResponse of SSE events under an `SSEGuard`."""

    def __init__(self, content, guard: SSEGuard, **kwargs):
        super().__init__(content, **kwargs)
        self.guard = guard
        self.transport = None
        self.behind_since: float | None = None
        self._ending: asyncio.Future | None = None
        self._end_message = ""

    async def __call__(self, scope, receive, send):
        self.transport = scope.get(TRANSPORT_KEY)
        await super().__call__(scope, receive, send)

    def end(self, message: str) -> None:
        """Ends the stream with an error event (from SSEGuard.end_all)."""
        if self._ending is not None and not self._ending.done():
            self._end_message = message
            self._ending.set_result(None)

    async def stream_response(self, send) -> None:
        self._ending = asyncio.get_running_loop().create_future()
        self.guard.streams.add(self)
        body = self.body_iterator
        nxt: asyncio.Future | None = None
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if self.guard.closing:
                self.end("the server is shutting down; retry the request")
            while True:
                nxt = asyncio.ensure_future(body.__anext__())
                await asyncio.wait({nxt, self._ending}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # shutdown: close the stream upstream, then end it cleanly here
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    await _close(body)
                    self.guard.ended_by_shutdown += 1
                    err = APIError(503, self._end_message, code="server_shutting_down")
                    for chunk in (R.sse(err.body()), R.SSE_DONE):
                        if not await self._send(send, chunk):
                            return
                    break
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                if not await self._send(send, chunk if isinstance(chunk, bytes) else chunk.encode(self.charset)):
                    await _close(body)
                    if self.transport is not None:  # the reset arrives as a disconnect, which ends us
                        await asyncio.sleep(1.0)
                    return
            await self._send(send, b"", more_body=False)
        except asyncio.CancelledError:
            # the client left (Starlette cancels us on http.disconnect): the body's pending step runs
            # in its own task, so cancel it too, which ends the generator (abort counted, calls cancelled)
            if nxt is not None and not nxt.done():
                nxt.cancel()
                await asyncio.gather(nxt, return_exceptions=True)
            await _close(body)
            raise
        finally:
            self.guard.streams.discard(self)

    async def _send(self, send, chunk: bytes, more_body: bool = True) -> bool:
        """One body message; False when the reader fell too far behind (the stream was given up)."""
        message = {"type": "http.response.body", "body": chunk, "more_body": more_body}
        task = asyncio.ensure_future(send(message))
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            now = time.monotonic()
            blocked = not done
            if blocked or backlog_bytes(self.transport) >= self.guard.max_backlog_bytes:
                if self.behind_since is None:
                    self.behind_since = now
            else:
                self.behind_since = None
            if self.behind_since is not None and now - self.behind_since >= self.guard.stall_timeout_s:
                if blocked:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                self._give_up()
                return False
            if done:
                task.result()
                return True

    def _give_up(self) -> None:
        self.guard.slow_readers_aborted += 1
        logger.warning("slow reader: %d bytes unread for %.0f s; the request is aborted and the connection "
                       "reset", backlog_bytes(self.transport), self.guard.stall_timeout_s)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


async def _close(body) -> None:
    """Closes the SSE body generator: its `finally` cancels the gRPC calls (router and nodes free)."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception as exc:  # the generator is being thrown away; never fail the stream on it
            logger.debug("closing a stream body: %r", exc)
