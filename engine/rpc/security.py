"""Credentials of every pdserve process: the node key (a shared secret of the router and its nodes,
distinct from client API keys) and TLS / mTLS on servers and client channels.

    security = Security.from_args(ns)                  # after add_security_args(parser)
    server = build_server(..., credentials=security.server_credentials(),
                          interceptors=[security.node_key_interceptor()])
    channel = aio_channel(address, security=security.client)   # TLS + node key on every call

Keys travel as `authorization: Bearer <key>` metadata and are compared in constant time against
every accepted key. Health and reflection always stay open.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

import grpc

from engine.cli_args import add_flag

OPEN_PREFIXES = ("/grpc.health", "/grpc.reflection")


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class ClientSecurity:
    """What a process presents when it calls a peer: the node key, TLS roots and its own certificate."""

    node_key: str | None = None
    tls_ca: str | None = None  # PEM bundle that verifies the servers we call; set = TLS channels
    tls_cert: str | None = None  # our certificate, sent when the server asks for one (mTLS)
    tls_key: str | None = None

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        return grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca),
                                            private_key=_read(self.tls_key),
                                            certificate_chain=_read(self.tls_cert))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.node_key}"),) if self.node_key else ()


@dataclass(frozen=True)
class Security:
    """Everything security-related one process was started with."""

    node_key: str | None = None
    tls_cert: str | None = None  # our server certificate (PEM)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: clients must present a certificate signed by it (mTLS)
    tls_ca: str | None = None  # verifies the servers we call

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")

    @classmethod
    def from_args(cls, ns) -> "Security":
        return cls(node_key=ns.node_key or None, tls_cert=ns.tls_cert, tls_key=ns.tls_key,
                   tls_client_ca=ns.tls_client_ca, tls_ca=ns.tls_ca)

    @property
    def client(self) -> ClientSecurity:
        return ClientSecurity(self.node_key, self.tls_ca, self.tls_cert, self.tls_key)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        return grpc.ssl_server_credentials([(_read(self.tls_key), _read(self.tls_cert))],
                                           root_certificates=_read(self.tls_client_ca),
                                           require_client_auth=bool(self.tls_client_ca))

    def node_key_interceptor(self) -> "KeyInterceptor | None":
        """For node servers: every pdserve RPC needs the node key, when one is set."""
        return KeyInterceptor([("/pdserve.v1.", [self.node_key], "node key")]) if self.node_key else None

    def argv(self) -> list[str]:
        """The TLS flags again, to forward to a child process (the node key goes by environment)."""
        out = []
        for flag, value in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                            ("--tls-client-ca", self.tls_client_ca), ("--tls-ca", self.tls_ca)):
            if value:
                out += [flag, value]
        return out


def add_security_args(parser) -> None:
    g = parser.add_argument_group("security")
    add_flag(g, "--node-key", default=None,
             help="shared secret of the router and its nodes (node registration, router -> node and "
                  "prefill -> decode calls); client API keys never grant these")
    add_flag(g, "--tls-cert", default=None, help="PEM certificate this process serves TLS with (and presents "
                                                "as a client certificate to peers that require mTLS)")
    add_flag(g, "--tls-key", default=None, help="PEM private key of --tls-cert")
    add_flag(g, "--tls-client-ca", default=None,
             help="PEM CA bundle; set: clients must present a certificate it signed (mTLS)")
    add_flag(g, "--tls-ca", default=None,
             help="PEM CA bundle that verifies the servers this process calls; set: its client channels use TLS")


# -- server side ---------------------------------------------------------------------------------

def bearer_ok(metadata, keys: list[bytes]) -> bool:
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


def _deny(handler, message: str):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

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


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """`rules`: (method prefix, accepted keys, what the key is called). The first rule whose prefix
    matches decides; an empty key list there refuses every call (a service that is switched off); no
    matching rule: open."""

    def __init__(self, rules: list[tuple[str, list[str], str]]):
        self.rules = [(prefix, [k.encode() for k in keys if k], what) for prefix, keys, what in rules]

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        for prefix, keys, what in self.rules:
            if method.startswith(prefix):
                if keys and bearer_ok(handler_call_details.invocation_metadata, keys):
                    return handler
                what = what if keys else f"{what} (this service is off: the server has no {what})"
                return _deny(handler, f"missing or invalid {what} (send metadata 'authorization: Bearer <key>')")
        return handler


# -- client side ---------------------------------------------------------------------------------

def _with_metadata(details: grpc.aio.ClientCallDetails, extra) -> grpc.aio.ClientCallDetails:
    metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"] + list(extra)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*metadata),
                                      details.credentials, details.wait_for_ready)


class _MetadataUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, extra):
        self.extra = extra

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_metadata(details, self.extra), request)


class _MetadataUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, extra):
        self.extra = extra

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_metadata(details, self.extra), request)


class _MetadataStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, extra):
        self.extra = extra

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_metadata(details, self.extra), request_iterator)


class _MetadataStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, extra):
        self.extra = extra

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_metadata(details, self.extra), request_iterator)


def metadata_interceptors(extra) -> list:
    """Client interceptors that add `extra` metadata to every call (all four call kinds)."""
    if not extra:
        return []
    return [cls(tuple(extra)) for cls in (_MetadataUnaryUnary, _MetadataUnaryStream, _MetadataStreamUnary,
                                          _MetadataStreamStream)]
