"""Client channels with the same limits and keepalive as our servers.

    aio_channel(address)                                   # plaintext, no key
    aio_channel(address, security=ClientSecurity(...))     # TLS when tls_ca is set, node key on every call
    aio_channel(address, options=NODE_KEEPALIVE)           # a frozen peer is noticed within ~4 s
"""
from __future__ import annotations

import grpc

from engine.rpc.security import ClientSecurity, metadata_interceptors
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
# Between our own processes: a peer that stops answering pings (SIGSTOP, a dead host, a partition)
# fails its calls with UNAVAILABLE after keepalive_time + keepalive_timeout. Our servers accept a
# ping per second (engine.rpc.server.SERVER_OPTIONS).
NODE_KEEPALIVE = (
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 2_000),
)


def aio_channel(address: str, credentials: grpc.ChannelCredentials | None = None, options=(),
                security: ClientSecurity | None = None) -> grpc.aio.Channel:
    opts = list({k: v for k, v in [*CHANNEL_OPTIONS, *options]}.items())  # later options win
    interceptors = []
    if security is not None:
        credentials = credentials or security.channel_credentials()
        interceptors = metadata_interceptors(security.metadata())
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=opts, interceptors=interceptors or None)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors or None)


def sync_channel(address: str, options=(), security: ClientSecurity | None = None) -> grpc.Channel:
    """A blocking channel (TLS when `security.tls_ca` is set); callers add any key as call metadata."""
    opts = list({k: v for k, v in [*CHANNEL_OPTIONS, *options]}.items())
    credentials = security.channel_credentials() if security is not None else None
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=opts)
    return grpc.insecure_channel(address, options=opts)
