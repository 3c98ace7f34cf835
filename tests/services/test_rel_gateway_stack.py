"""Issue 14 F7 (HTTP side) and item 7 against one real `pdserve serve` stack with its gateway (tiny
model, loopback): an HTTP client that stops reading an SSE stream is aborted upstream and its
connection reset by the gateway's watchdog, bystanders unharmed; on SIGTERM the stack lets a short
request finish, then ends an SSE stream with an error event and `data: [DONE]` and a gRPC stream
with UNAVAILABLE. The tests share the stack and run in file order; the last one stops it."""
from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import grpc
import httpx
import pytest

from protos.pdserve.v1 import generation_pb2 as g
from tests.services.helpers import greedy_request, wait_idle
from tests.services.stack import start_stack

KEY, ADMIN_KEY = "gw-user", "gw-admin"
USER, ADMIN = (("authorization", f"Bearer {KEY}"),), (("authorization", f"Bearer {ADMIN_KEY}"),)
GRACE_S = 2.0
STALL_S = 1.5
TEXT = "one two three four five six seven eight"


@pytest.fixture(scope="module")
def stack(make_tiny_model):
    args = ("--api-key", KEY, "--admin-key", ADMIN_KEY, "--max-model-len", "512", "--num-gpu-blocks", "512",
            "--grace-period", str(GRACE_S))
    env = {"PDSERVE_SSE_STALL_TIMEOUT": str(STALL_S), "PDSERVE_SSE_MAX_BACKLOG": "32768"}
    with start_stack(make_tiny_model("llama"), num_prefill=1, num_decode=1, gateway=True, extra_args=args,
                     env=env) as s:
        yield s


@pytest.fixture(scope="module")
def stub(stack):
    return stack.stub()


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.gateway_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(http):
    return http.get("/v1/models").json()["data"][0]["id"]


def _complete(http, model: str, i: int) -> str:
    reply = http.post("/v1/completions", json={"model": model, "prompt": f"{TEXT} {i}", "max_tokens": 6,
                                               "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def expected(http, model):
    return {i: _complete(http, model, i) for i in range(4)}


def bystanders_ok(http, model, expected) -> None:
    got = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _complete(http, model, i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


class _Admin:
    def __init__(self, stub):
        self.stub = stub

    def GetLoads(self, request, timeout=None):
        return self.stub.GetLoads(request, metadata=ADMIN, timeout=timeout)


def _busy(stub) -> bool:
    loads = stub.GetLoads(g.GetLoadsRequest(), metadata=ADMIN, timeout=5)
    return bool(loads.router_request_ids) or any(n.load.request_ids for n in loads.nodes)


def _metric(http, name: str) -> float:
    text = http.get("/metrics").text
    values = [float(m.group(1)) for m in re.finditer(rf"^pdserve:{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


def _stream_body(model: str, max_tokens: int, **extra) -> dict:
    return {"model": model, "prompt": TEXT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0, **extra}


@pytest.mark.timeout(300)
def test_http_reader_that_stops_reading_is_aborted_and_reset(stack, stub, http, model, expected):
    aborts_before = _metric(http, "aborts")
    host, port = stack.gateway_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect((host, int(port)))
    # 4 completions x 500 tokens, each chunk with 5 logprobs: megabytes, far more than any buffer
    body = json.dumps(_stream_body(model, 500, n=4, logprobs=5, temperature=1.0, seed=3)).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        start = time.monotonic()
        seen_busy = False
        while time.monotonic() - start < 30:  # never read: the watchdog must free everything
            busy = _busy(stub)
            seen_busy |= busy
            if seen_busy and not busy:
                break
            time.sleep(0.2)
        freed_after = time.monotonic() - start
        assert seen_busy and not _busy(stub), "the request was never seen running, or never freed"
        assert freed_after < 20, freed_after
        # the gateway reset the connection: reading now ends in a reset / EOF, without [DONE]
        sock.settimeout(10)
        data, reset = b"", False
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            reset = True
        assert reset or b"data: [DONE]" not in data
        assert b"data: [DONE]" not in data  # it was aborted, never completed
    finally:
        sock.close()
    assert _metric(http, "aborts") >= aborts_before + 1
    assert _metric(http, "num_requests_running") == 0
    loads = wait_idle(_Admin(stub), 20)
    for n in loads.nodes:
        assert n.load.free_blocks == n.load.total_blocks, (n.node_id, n.load)
    bystanders_ok(http, model, expected)


@pytest.mark.timeout(300)
def test_a_reader_that_keeps_up_is_never_aborted(http, model):
    """The watchdog's limits are small in this stack; a normal streaming client still gets every chunk."""
    with http.stream("POST", "/v1/completions", json=_stream_body(model, 300, logprobs=5)) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"]) == 300


def _sse_events(url: str, body: dict, out: dict) -> None:
    out["lines"] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as reply:
            out["status"] = reply.status_code
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    out["lines"].append(line)
    except httpx.HTTPError as exc:  # a cut connection: what must not happen
        out["error"] = repr(exc)
    out["ended_at"] = time.monotonic()


@pytest.mark.timeout(300)
def test_sigterm_ends_streams_clearly_after_the_grace(stack, stub, http, model):
    # long streams: far longer than the grace period (the tiny model's 480 tokens x n=8 take well
    # over GRACE_S on CPU; a short request finishes within it). No logprobs: the gateway looks up
    # token strings with Detokenize calls, which a router that is shutting down no longer accepts.
    sse: dict = {}
    long_body = _stream_body(model, 480, n=8, temperature=1.0, seed=5)
    reader = threading.Thread(target=_sse_events, args=(stack.gateway_url, long_body, sse))
    reader.start()
    req = greedy_request(TEXT, 480)
    req.stopping.ignore_eos = True
    grpc_stream = stub.GenerateStream(req, metadata=USER, timeout=60)
    next(grpc_stream)
    deadline = time.monotonic() + 60
    while len(sse.get("lines", ())) < 40 and time.monotonic() < deadline:  # every completion is decoding
        time.sleep(0.05)
    assert len(sse["lines"]) >= 40 and not any("[DONE]" in line for line in sse["lines"])
    short: dict = {}
    short_thread = threading.Thread(target=lambda: short.update(text=_complete(http, model, 0)))
    short_thread.start()
    time.sleep(0.2)
    sigterm_at = time.monotonic()
    stack.serve.send_signal(signal.SIGTERM)

    short_thread.join(60)
    assert short.get("text"), "a short request in flight at SIGTERM must finish within the grace"
    try:
        for _ in grpc_stream:
            pass
        pytest.fail("a 480-token stream finished within the grace period; make it longer")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert "shutting down" in err.details()
    assert time.monotonic() - sigterm_at < GRACE_S + 8
    reader.join(60)
    assert "error" not in sse, sse.get("error")
    assert sse["status"] == 200
    lines = sse["lines"]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    final = json.loads(lines[-2][6:])
    assert "shutting down" in final["error"]["message"], final
    assert sse["ended_at"] - sigterm_at < GRACE_S + 8
    with pytest.raises(httpx.HTTPError):  # and the gateway no longer accepts
        httpx.get(f"{stack.gateway_url}/health", timeout=5)
    stack.serve.wait(30)
