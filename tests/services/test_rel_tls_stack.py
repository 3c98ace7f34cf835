"""Issue 14 item 6 end to end: `pdserve serve` with mTLS on (--tls-cert/--tls-key/--tls-ca and
--tls-client-ca), so every hop runs TLS: gateway (HTTPS) -> router -> prefill -> decode. The OpenAI
SDK (httpx verifying our CA, presenting a client certificate) completes a request, also streamed;
a client without a certificate is refused by the gateway and by the router; plaintext is refused.
Certificates are made here (tests/services/test_rel_tls.py)."""
from __future__ import annotations

import ssl

import grpc
import httpx
import openai
import pytest

from engine.rpc.channel import sync_channel
from engine.rpc.security import ClientSecurity
from protos.pdserve.v1 import generation_pb2_grpc
from tests.services.helpers import greedy_request
from tests.services.stack import start_stack
from tests.services.test_rel_tls import pki  # noqa: F401 - the module's certificates fixture

KEY = "tls-user"
USER = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def stack(make_tiny_model, pki):  # noqa: F811
    args = ("--api-key", KEY, "--tls-cert", pki["server"], "--tls-key", pki["server_key"], "--tls-ca", pki["ca"],
            "--tls-client-ca", pki["ca"])
    with start_stack(make_tiny_model("llama"), num_prefill=1, num_decode=1, gateway=True, extra_args=args) as s:
        yield s


def _https(stack) -> str:
    return stack.gateway_url.replace("http://", "https://", 1)


def _sdk(stack, pki, cert: bool) -> openai.OpenAI:  # noqa: F811
    verify = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        verify.load_cert_chain(pki["client"], pki["client_key"])
    return openai.OpenAI(base_url=_https(stack) + "/v1", api_key=KEY, max_retries=0, timeout=60,
                         http_client=httpx.Client(verify=verify))


@pytest.mark.timeout(300)
def test_openai_sdk_over_https_with_a_client_certificate(stack, pki):  # noqa: F811
    client = _sdk(stack, pki, cert=True)
    model = client.models.list().data[0].id
    reply = client.completions.create(model=model, prompt="one two three", max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in chat if c.choices]
    assert len(pieces) >= 2
    # the same greedy text as the router gives a gRPC client with a certificate (prefill -> decode
    # over TLS too: the request went through the whole stack)
    security = ClientSecurity(tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"])
    with sync_channel(stack.router_address.replace("0.0.0.0", "127.0.0.1"), security=security) as channel:
        got = generation_pb2_grpc.GenerationStub(channel).Generate(greedy_request("one two three", 8), metadata=USER,
                                                                   timeout=60)
    assert got.completions[0].text == reply.choices[0].text


@pytest.mark.timeout(120)
def test_clients_without_a_certificate_are_refused(stack, pki):  # noqa: F811
    client = _sdk(stack, pki, cert=False)
    with pytest.raises(openai.APIConnectionError):  # the TLS handshake fails: no request reaches the app
        client.models.list()
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP on the HTTPS port
        httpx.get(stack.gateway_url + "/health", timeout=10)
    no_cert = ClientSecurity(tls_ca=pki["ca"])
    for security in (no_cert, None):  # the router: TLS without a certificate, and plaintext
        with sync_channel(stack.router_address, security=security) as channel:
            with pytest.raises(grpc.RpcError) as err:
                generation_pb2_grpc.GenerationStub(channel).Generate(greedy_request("hi", 2), metadata=USER, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(300)
def test_nccl_kv_pairs_rendezvous_over_tls_with_the_node_key(stack, make_tiny_model, pki):  # noqa: F811
    """--kv-transport nccl (gloo on CPU) under mTLS and the node key `pdserve serve` gives its nodes:
    the pair's store calls (KVRendezvous on the decode node's port) pass both, and the KV moves over
    the pair group: the same greedy text as the gRPC-transport stack."""
    args = ("--api-key", KEY, "--tls-cert", pki["server"], "--tls-key", pki["server_key"], "--tls-ca", pki["ca"],
            "--tls-client-ca", pki["ca"])
    security = ClientSecurity(tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"])

    def generate(address: str):
        with sync_channel(address.replace("0.0.0.0", "127.0.0.1"), security=security) as channel:
            return generation_pb2_grpc.GenerationStub(channel).Generate(greedy_request("one two three", 8),
                                                                        metadata=USER, timeout=60).completions[0]
    want = generate(stack.router_address)
    with start_stack(make_tiny_model("llama"), kv_transport="nccl", extra_args=args) as nccl_stack:
        got = generate(nccl_stack.router_address)
    assert got.timings.kv_transport == "nccl" and got.timings.kv_transfer_bytes > 0, got.timings
    assert want.timings.kv_transport == "grpc"
    assert got.text == want.text and list(got.token_ids) == list(want.token_ids)
