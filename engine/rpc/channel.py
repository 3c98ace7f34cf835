"""Client channels with the same limits and keepalive as our servers."""
from __future__ import annotations

import grpc

from engine.rpc.server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 0),  # retries are a policy decision of the router, not the channel
)


def aio_channel(address: str, credentials: grpc.ChannelCredentials | None = None,
                options=()) -> grpc.aio.Channel:
    opts = [*CHANNEL_OPTIONS, *options]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


def sync_channel(address: str, options=()) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, *options])
