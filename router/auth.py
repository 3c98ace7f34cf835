"""API keys on the public API: `authorization: Bearer <key>` metadata, compared in constant time.

Health, reflection and the nodes' RouterControl stay open (RouterControl binds loopback)."""
from __future__ import annotations

import hmac

import grpc

PROTECTED_PREFIX = "/pdserve.v1.Generation/"


def _key_ok(metadata, keys: list[bytes]) -> bool:
    for key, value in metadata or ():
        if key == "authorization":
            value = value.encode() if isinstance(value, str) else value
            if not value.startswith(b"Bearer "):
                return False
            given = value[len(b"Bearer "):].strip()
            ok = False
            for k in keys:  # compare with every key, so timing does not say which one matched
                ok |= hmac.compare_digest(given, k)
            return ok
    return False


def _deny(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key "
                            "(send metadata 'authorization: Bearer <key>')")

    async def streaming(request, context):
        await unary(request, context)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(streaming, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or not self._keys or not handler_call_details.method.startswith(PROTECTED_PREFIX)
                or _key_ok(handler_call_details.invocation_metadata, self._keys)):
            return handler
        return _deny(handler)
