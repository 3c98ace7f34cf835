"""Issue 14 item 8 and the node key (F1), in process: TLS and mTLS on our servers, the matching
client channels, and the node key every pdserve RPC needs when one is set. Certificates are made
here with `cryptography` (a CA, a server certificate for 127.0.0.1 / localhost, a client one)."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.rpc.channel import aio_channel
from engine.rpc.errors import Unavailable
from engine.rpc.security import ClientSecurity, Security
from engine.rpc.server import build_server
from protos.pdserve.v1 import router_pb2, router_pb2_grpc


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, san: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None) -> str:
    data = cert.public_bytes(serialization.Encoding.PEM) if cert is not None else key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("pdserve test CA", ca_key, _name("pdserve test CA"), ca_key, ca=True)
    out = {"ca": _write(d / "ca.pem", cert=ca)}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        out[who] = _write(d / f"{who}.pem", cert=_cert(who, key, ca.subject, ca_key, san=True))
        out[f"{who}_key"] = _write(d / f"{who}.key", key=key)
    other_key = ec.generate_private_key(ec.SECP256R1())  # a CA nobody trusts
    other = _cert("other CA", other_key, _name("other CA"), other_key, ca=True)
    out["other_ca"] = _write(d / "other.pem", cert=other)
    return out


class _Control(router_pb2_grpc.RouterControlServicer):
    async def Heartbeat(self, request, context):
        return router_pb2.HeartbeatResponse(known=request.node_id == "n1")

    async def Register(self, request, context):
        raise Unavailable("no room now")


async def _serve(security: Security):
    interceptor = security.node_key_interceptor()
    server = build_server([(router_pb2_grpc.add_RouterControlServicer_to_server, _Control())], port=0,
                          interceptors=[interceptor] if interceptor else (),
                          credentials=security.server_credentials())
    await server.start()
    await server.set_serving(True)
    return server


async def _heartbeat(address: str, client: ClientSecurity | None):
    async with aio_channel(address, security=client) as channel:
        return await router_pb2_grpc.RouterControlStub(channel).Heartbeat(
            router_pb2.HeartbeatRequest(node_id="n1"), timeout=5)


async def _health(address: str, client: ClientSecurity | None):
    async with aio_channel(address, security=client) as channel:
        return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


@pytest.mark.timeout(60)
def test_tls_and_mtls_refuse_clients_without_the_right_certificate(pki):
    async def main():
        tls = await _serve(Security(tls_cert=pki["server"], tls_key=pki["server_key"]))
        mtls = await _serve(Security(tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]))
        try:
            assert (await _heartbeat(tls.address, ClientSecurity(tls_ca=pki["ca"]))).known
            for client in (None, ClientSecurity(tls_ca=pki["other_ca"])):  # plaintext; a server we cannot verify
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _heartbeat(tls.address, client)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as err:  # mTLS: no client certificate
                await _heartbeat(mtls.address, ClientSecurity(tls_ca=pki["ca"]))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with_cert = ClientSecurity(tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"])
            assert (await _heartbeat(mtls.address, with_cert)).known
            assert (await _health(mtls.address, with_cert)).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await tls.stop(0)
            await mtls.stop(0)
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_node_key_on_every_pdserve_rpc_health_stays_open(pki):
    async def main():
        server = await _serve(Security(node_key="nk", tls_cert=pki["server"], tls_key=pki["server_key"]))
        try:
            for client in (ClientSecurity(tls_ca=pki["ca"]), ClientSecurity(node_key="wrong", tls_ca=pki["ca"])):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _heartbeat(server.address, client)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "node key" in err.value.details()
            assert (await _heartbeat(server.address, ClientSecurity(node_key="nk", tls_ca=pki["ca"]))).known
            assert (await _health(server.address, ClientSecurity(tls_ca=pki["ca"]))).status == \
                health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(0)
    asyncio.run(main())


def test_tls_flags_go_together():
    with pytest.raises(ValueError):
        Security(tls_cert="a.pem")
    with pytest.raises(ValueError):
        Security(tls_client_ca="ca.pem")


@pytest.mark.timeout(60)
def test_retryable_statuses_carry_retry_after():
    async def main():
        server = await _serve(Security())
        try:
            async with aio_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await router_pb2_grpc.RouterControlStub(channel).Register(router_pb2.RegisterNodeRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ("retry-after", "1") in tuple(err.value.trailing_metadata())
        finally:
            await server.stop(0)
    asyncio.run(main())
