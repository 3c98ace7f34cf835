"""Exceptions our code raises on purpose, each naming the gRPC status code it maps to.

Builtins map too (see `engine.rpc.server.status_for`): ValueError -> INVALID_ARGUMENT,
KeyError/LookupError -> NOT_FOUND, MemoryError -> RESOURCE_EXHAUSTED, TimeoutError ->
DEADLINE_EXCEEDED. Messages must be short, human and free of paths or other requests' data.
"""
from __future__ import annotations

import grpc


class RpcError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(RpcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RpcError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RpcError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(RpcError):
    code = grpc.StatusCode.CANCELLED
