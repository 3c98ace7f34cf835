"""`build_server()`: a grpc.aio server with health, reflection and one error interceptor.

    server = build_server([(node_pb2_grpc.add_DecodeNodeServicer_to_server, servicer)], port=0)
    await server.start()            # health says NOT_SERVING until set_serving(True)
    await server.set_serving(True)
    ...
    await server.stop(grace=5.0)    # health NOT_SERVING first, then drain

The interceptor is the only place where exceptions become status codes (see `status_for`).
Requests that do not parse become INVALID_ARGUMENT before any servicer code runs.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.rpc.errors import RpcError
from engine.rpc.reflection import HealthServicer, enable_reflection

logger = logging.getLogger("pdserve.rpc")

MAX_MESSAGE_BYTES = 16 * 2**20  # a KV frame is <= 8 MiB of payload (MAX_FRAME_BYTES); prompts of 100k tokens fit
_MAX_MESSAGE_CHARS = 400
RETRY_AFTER_S = 1  # sent as `retry-after` trailing metadata with the statuses a client may retry
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),  # our node channels ping every 2 s (NODE_KEEPALIVE)
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by servicer code."""
    if isinstance(exc, RpcError):
        return exc.code, _short(exc.message)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, _short(_text(exc))
    if isinstance(exc, LookupError):  # KeyError, IndexError
        return grpc.StatusCode.NOT_FOUND, _short(_text(exc))
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _short(_text(exc) or "out of memory")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, _short(_text(exc) or "deadline exceeded")
    return grpc.StatusCode.INTERNAL, "internal error"


def _text(exc: BaseException) -> str:
    return str(exc.args[0]) if len(exc.args) == 1 else str(exc)


def _short(message: str) -> str:
    message = " ".join(message.split())  # no newlines in a status message
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 3] + "..."


class _Malformed:
    """Stands for a request that did not parse; the wrapped handler turns it into INVALID_ARGUMENT."""


_MALFORMED = _Malformed()


def _safe_deserializer(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:
            return _MALFORMED
    return parse


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException):
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        ref = uuid.uuid4().hex[:8]
        logger.error("%s failed (ref %s)", method, ref, exc_info=exc)
        message = f"internal error (ref {ref})"
    else:
        logger.info("%s -> %s: %s", method, code.name, message)
    if code in RETRYABLE:
        context.set_trailing_metadata((("retry-after", str(RETRY_AFTER_S)),))
    await context.abort(code, message)


def _check(request):
    if request is _MALFORMED:
        raise ValueError("malformed request: not a valid protobuf message of this method's type")
    return request


async def _checked_stream(requests):
    async for request in requests:
        yield _check(request)


def _passthrough(exc: BaseException) -> bool:
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit, KeyboardInterrupt,
                            SystemExit))


def _wrap(behavior: Callable, method: str, stream_in: bool, stream_out: bool) -> Callable:
    def arg(request):
        return _checked_stream(request) if stream_in else _check(request)

    if stream_out and inspect.isasyncgenfunction(behavior):
        async def streaming(request, context):
            try:
                async for response in behavior(arg(request), context):
                    yield response
            except BaseException as exc:
                if _passthrough(exc):
                    raise
                await _abort(context, method, exc)
        return streaming

    async def unary(request, context):
        try:
            return await behavior(arg(request), context)
        except BaseException as exc:
            if _passthrough(exc):
                raise
            await _abort(context, method, exc)
    return unary


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes; logs tracebacks server-side only. Methods named in
    `raw_requests` ("/package.Service/Method") get their requests as the received bytes, unparsed
    (a servicer that parses them itself, e.g. to read a large payload in place)."""

    def __init__(self, raw_requests: Sequence[str] = ()):
        self.raw_requests = frozenset(raw_requests)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        method = handler_call_details.method
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
        }
        key = (handler.request_streaming, handler.response_streaming)
        attr, make = kinds[key]
        return make(_wrap(getattr(handler, attr), method, *key),
                    request_deserializer=(None if method in self.raw_requests
                                          else _safe_deserializer(handler.request_deserializer)),
                    response_serializer=handler.response_serializer)


def service_name(add_fn: Callable) -> str:
    """Full name of the service that a generated `add_XServicer_to_server` registers."""
    short = add_fn.__name__.removeprefix("add_").removesuffix("Servicer_to_server")
    module = sys.modules[add_fn.__module__]
    for value in vars(module).values():
        services = getattr(getattr(value, "DESCRIPTOR", None), "services_by_name", None)
        if services and short in services:
            return services[short].full_name
    raise LookupError(f"no service {short!r} in {module.__name__}")


@dataclass
class RpcServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    host: str
    port: int
    service_names: tuple[str, ...]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Health NOT_SERVING first, then stop accepting calls and let in-flight ones finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def build_server(servicers: Sequence[tuple[Callable, Any]], port: int = 0, host: str = "127.0.0.1",
                 options: Sequence[tuple[str, Any]] = (), interceptors: Sequence = (),
                 credentials: grpc.ServerCredentials | None = None) -> RpcServer:
    """`servicers`: (generated add_XServicer_to_server, servicer) pairs; a servicer's `RAW_REQUESTS`
    (full method names) take their requests unparsed. Port 0 picks a free port.
    Must be called with the event loop that will run the server current (inside `async def`)."""
    raw = [m for _, servicer in servicers for m in getattr(servicer, "RAW_REQUESTS", ())]
    server = grpc.aio.server(interceptors=[ErrorInterceptor(raw), *interceptors],
                             options=[*SERVER_OPTIONS, *options])
    names = []
    for add_fn, servicer in servicers:
        add_fn(servicer, server)
        names.append(service_name(add_fn))
    health_servicer = HealthServicer()  # answers List too
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, names)  # grpc.reflection.v1 and v1alpha
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = (server.add_secure_port(target, credentials) if credentials is not None
             else server.add_insecure_port(target))
    if bound == 0:
        raise OSError(f"could not bind {target}")
    return RpcServer(server, health_servicer, host, bound, tuple(names))


def run(main: Callable[[], Any]) -> Any:
    """Runs `main()` (a coroutine function) on uvloop when it is installed, else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
