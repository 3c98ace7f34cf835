"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, and the one mapping of
router gRPC status codes to HTTP statuses.

    INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE -> 400 (the router's message, verbatim; `param`
                                                            is the sampling field it starts with)
    NOT_FOUND                                        -> 404 (unknown model)
    RESOURCE_EXHAUSTED                               -> 429 (overload: retry later)
    UNAVAILABLE                                      -> 503 (no healthy node, router draining or down)
    DEADLINE_EXCEEDED                                -> 504 (the request's time limit ran out upstream)
    UNAUTHENTICATED, PERMISSION_DENIED               -> 502 (the router refused the gateway's own key:
                                                            a deployment problem, not the client's)
    CANCELLED                                        -> 503 (cancelled upstream: a node or the router
                                                            gave up; a client that left is ClientGone, 499)
    anything else                                    -> 500 "internal error"
"""
from __future__ import annotations

from typing import Mapping

import grpc

from engine.sampling_proto import PARAM_NAMES

_MAX_MESSAGE_CHARS = 500

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
    499: "cancelled", 500: "internal_error", 502: "bad_gateway", 503: "service_unavailable_error",
    504: "timeout_error",
}

_FROM_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 502,
    grpc.StatusCode.PERMISSION_DENIED: 502,
    grpc.StatusCode.CANCELLED: 503,
}


class APIError(Exception):
    """An error the client sees as `status` with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, _short(message), param
        self.code = code if code is not None else _TYPES.get(status, "error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def _short(message: str) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS - 3] + "..."


def sampling_param(message: str, renamed: Mapping[str, str] | None = None) -> str | None:
    """The OpenAI parameter a sampling refusal names: its message starts with the SamplingParams
    field ("temperature must be >= 0, got -1.0"), which is the OpenAI name unless `renamed` maps it
    (chat's `top_logprobs` is the engine's logprobs)."""
    word = message.split(" ", 1)[0]
    if word not in PARAM_NAMES:
        return None
    return (renamed or {}).get(word, word)


def from_grpc(err: grpc.aio.AioRpcError) -> APIError:
    code = err.code()
    status = _FROM_GRPC.get(code, 500)
    details = err.details() or code.name.lower()
    if status == 502:
        return APIError(502, "the router refused the gateway's credentials (check --router-api-key)",
                        code="router_unauthenticated")
    if status == 503 and code == grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        details = "router unavailable"  # never echo socket addresses or OS errors to clients
    if status == 500:
        # the router's interceptor already strips tracebacks; keep its short message and ref
        details = details if details.startswith("internal error") else "internal error"
    param = sampling_param(details) if status == 400 else None
    return APIError(status, details, param=param, code=code.name.lower())
