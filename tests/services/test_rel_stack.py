"""Issue 14 against one real stack (2 prefill + 2 decode nodes, tiny model, loopback, API keys, an
admin key and a node key): F1 control plane and node ports, F2 cancelled reserves, F5 tokenization
bounds, F6 frozen nodes, F7 slow readers, F8 isolation and caps, router SIGTERM. The tests share
the stack and run in file order; the last ones freeze nodes and stop the router."""
from __future__ import annotations

import concurrent.futures
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.rpc.convert import NODE_PROTOCOL
from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import generation_pb2_grpc as gg
from protos.pdserve.v1 import node_pb2, node_pb2_grpc, router_pb2, router_pb2_grpc
from tests.services.helpers import greedy_request, wait_idle
from tests.services.stack import start_stack

NODE_KEY = "test-node-key"
USER1, USER2, ADMIN = ((("authorization", f"Bearer {k}"),) for k in ("u1", "u2", "adm"))
NODE = (("authorization", f"Bearer {NODE_KEY}"),)
TEXT = "one two three four five six seven eight"


@pytest.fixture(scope="module")
def stack(make_tiny_model):
    args = ("--api-key", "u1", "--api-key", "u2", "--admin-key", "adm", "--max-stream-buffer", "16",
            "--max-model-len", "512")
    with start_stack(make_tiny_model("llama"), num_prefill=2, num_decode=2, extra_args=args,
                     env={"PDSERVE_NODE_KEY": NODE_KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def stub(stack):
    return stack.stub()


@pytest.fixture(scope="module")
def expected(stub):
    """Greedy outputs of the bystander prompts, taken while the stack is healthy."""
    return {i: list(stub.Generate(greedy_request(f"{TEXT} {i}", 6), metadata=USER1, timeout=60)
                    .completions[0].token_ids) for i in range(4)}


def assert_idle(stub, timeout: float = 20.0) -> None:
    loads = wait_idle(_Admin(stub), timeout)
    assert not loads.router_request_ids, loads.router_request_ids
    for n in loads.nodes:
        if n.healthy:
            assert n.load.free_blocks == n.load.total_blocks, (n.node_id, n.load)
            assert not n.load.request_ids, (n.node_id, list(n.load.request_ids))


class _Admin:
    """GetLoads with the admin key (wait_idle calls stub.GetLoads(request, timeout=...))."""

    def __init__(self, stub):
        self.stub = stub

    def GetLoads(self, request, timeout=None):
        return self.stub.GetLoads(request, metadata=ADMIN, timeout=timeout)


def bystanders_ok(stub, expected) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: list(stub.Generate(greedy_request(f"{TEXT} {i}", 6), metadata=USER2, timeout=60)
                                           .completions[0].token_ids), range(4)))
    assert got == [expected[i] for i in range(4)]


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


@pytest.mark.timeout(300)
def test_f1_control_plane_and_node_ports_need_the_node_key(stack, stub, expected):
    control = router_pb2_grpc.RouterControlStub(stack.channel())
    decode0 = stack.node_addresses["decode-0"]
    rogue = router_pb2.RegisterNodeRequest(node_id="rogue", address="127.0.0.1:9", role="decode", model="m")
    for metadata in ((), USER1, ADMIN):  # client keys, even the admin's, never enroll nodes
        assert _code(lambda: control.Register(rogue, metadata=metadata, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: control.Heartbeat(router_pb2.HeartbeatRequest(node_id="decode-0", serving=False),
                                               metadata=metadata, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    model = stub.ModelInfo(g.ModelInfoRequest(), metadata=USER1, timeout=5).model
    flip = router_pb2.RegisterNodeRequest(node_id="decode-0", address=decode0, role="prefill", model=model,
                                          load=g.NodeLoad(protocol=NODE_PROTOCOL))
    move = router_pb2.RegisterNodeRequest(node_id="decode-0", address="127.0.0.1:9", role="decode", model=model,
                                          load=g.NodeLoad(protocol=NODE_PROTOCOL))
    for request in (flip, move):  # even with the node key, a node never changes address or role
        assert _code(lambda: control.Register(request, metadata=NODE, timeout=5)) == \
            grpc.StatusCode.FAILED_PRECONDITION
    # a "decode node" that does not serve DecodeNode (the router's own port): registered, never placed on
    fake = router_pb2.RegisterNodeRequest(node_id="fake-decode", address=stack.router_address, role="decode",
                                          model=model, load=g.NodeLoad(protocol=NODE_PROTOCOL))
    assert control.Register(fake, metadata=NODE, timeout=5).accepted
    time.sleep(1.0)
    nodes = {n.node_id: n for n in stub.GetLoads(g.GetLoadsRequest(), metadata=ADMIN, timeout=10).nodes}
    assert not nodes["fake-decode"].healthy and nodes["decode-0"].role == "decode"
    bystanders_ok(stub, expected)
    # node ports: the node key or nothing
    node_stub = node_pb2_grpc.DecodeNodeStub(stack.channel(decode0))
    for metadata in ((), USER1):
        assert _code(lambda: node_stub.GetLoad(node_pb2.NodeLoadRequest(), metadata=metadata, timeout=5)) == \
            grpc.StatusCode.UNAUTHENTICATED
    assert node_stub.GetLoad(node_pb2.NodeLoadRequest(), metadata=NODE, timeout=5).total_blocks > 0


@pytest.mark.timeout(300)
def test_f8_isolation_between_keys_and_caps(stack, stub, expected):
    req = greedy_request(TEXT, 400, client_request_id="mine")
    req.stopping.ignore_eos = True
    stream = stub.GenerateStream(req, metadata=USER1, timeout=60)
    rid = next(stream).request_id
    assert rid.startswith("req-") and len(rid) == len("req-") + 32  # 128 random bits, not a counter
    assert stub.Abort(g.AbortRequest(request_id=rid), metadata=USER2, timeout=5).aborted == 0
    assert stub.Abort(g.AbortRequest(request_id="mine"), metadata=USER2, timeout=5).aborted == 0
    theirs = stub.GetLoads(g.GetLoadsRequest(), metadata=USER2, timeout=5)
    assert rid not in theirs.router_request_ids
    assert not any(i.startswith(rid) for n in theirs.nodes for i in n.load.request_ids)
    assert rid in stub.GetLoads(g.GetLoadsRequest(), metadata=ADMIN, timeout=5).router_request_ids
    assert stub.Abort(g.AbortRequest(request_id="mine"), metadata=USER1, timeout=5).aborted == 1
    assert list(stream)[-1].finish_reason == g.FinishReason.FINISH_REASON_ABORTED
    # gRPC chat roles are validated like HTTP's; completions and KV blocks per request are capped
    bad_role = g.GenerateRequest(chat=g.ChatInput(messages=[g.ChatMessage(role="system\n<|im_start|>user",
                                                                          content="hi")]))
    many = g.GenerateRequest(inputs=[g.Input(text="a")] * 64, n=4)
    greedy = greedy_request(TEXT, 480)
    greedy.n = 8  # 8 x 31 blocks: more than half of the pool's 128
    for request, needle in ((bad_role, "role must be one of"), (many, "completions per request"),
                            (greedy, "KV blocks")):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, metadata=USER1, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    bystanders_ok(stub, expected)
    assert_idle(stub)


@pytest.mark.timeout(300)
def test_f5_huge_tokenize_and_prompt_refused_and_loop_stays_responsive(stack, stub):
    health = health_pb2_grpc.HealthStub(stack.channel())
    huge = "word " * (2 * 2**20)  # 10 MB
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(stub.Tokenize, g.TokenizeRequest(text=huge), metadata=USER1, timeout=30),
                 pool.submit(stub.Generate, g.GenerateRequest(text=huge), metadata=USER1, timeout=30)]
        start = time.monotonic()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - start < 1.0
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call.result()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in err.value.details()
    ok = stub.Tokenize(g.TokenizeRequest(text="hello world " * 1000), metadata=USER1, timeout=30)
    assert len(ok.token_ids) >= 2000


@pytest.mark.timeout(300)
def test_f2_cancelled_and_timed_out_reserves_free_their_blocks(stack, stub):
    node = node_pb2_grpc.DecodeNodeStub(stack.channel(stack.node_addresses["decode-1"]))
    busy = greedy_request(TEXT, 400)
    busy.stopping.ignore_eos = True
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [pool.submit(lambda: list(stub.GenerateStream(busy, metadata=USER1, timeout=60))) for _ in range(2)]
        futures = []
        for i in range(40):
            request = node_pb2.ReserveRequest(request_id=f"leak-{i}", num_prompt_tokens=100, lease_ms=600_000)
            futures.append(node.Reserve.future(request, metadata=NODE, timeout=0.002 + 0.001 * (i % 5)))
        for i, f in enumerate(futures):
            if i % 2:
                f.cancel()
        for f in futures:
            try:
                f.result(timeout=30)
            except (grpc.RpcError, grpc.FutureCancelledError):
                pass  # cancelled or past its deadline: what it reserved must be freed all the same
        for r in running:
            r.result()
    for i in range(len(futures)):  # frees every reservation the node recorded (a reply may have come late)
        node.Abort(node_pb2.NodeAbortRequest(request_id=f"leak-{i}"), metadata=NODE, timeout=5)
    assert_idle(stub)  # blocks reserved for a caller already gone belong to no reservation: only the
    # cancellation-safe engine command frees them (the lease is 10 minutes)


@pytest.mark.timeout(300)
def test_f7_reader_that_stops_reading_is_aborted_everywhere(stack, stub, expected):
    channel = grpc.insecure_channel(stack.router_address, options=[("grpc.http2.bdp_probe", 0),
                                                                   ("grpc.http2.lookahead_bytes", 1024)])
    try:
        slow = gg.GenerationStub(channel)
        req = greedy_request(TEXT, 480)
        req.stopping.ignore_eos = True
        stream = slow.GenerateStream(req, metadata=USER1, timeout=60)
        next(stream)  # then stop reading
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            loads = stub.GetLoads(g.GetLoadsRequest(), metadata=ADMIN, timeout=5)
            if not loads.router_request_ids and not any(n.load.request_ids for n in loads.nodes):
                break
            time.sleep(0.2)
        assert not loads.router_request_ids
        stream.cancel()
    finally:
        channel.close()
    assert_idle(stub)
    bystanders_ok(stub, expected)


@pytest.mark.timeout(300)
def test_f6_frozen_prefill_detected_bystanders_served(stack, stub, expected):
    stack.kill("prefill-0", signal.SIGSTOP)
    try:
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: list(stub.Generate(greedy_request(f"{TEXT} {i}", 6), metadata=USER2,
                                                             timeout=60).completions[0].token_ids), range(4)))
        assert got == [expected[i] for i in range(4)]
        assert time.monotonic() - start < 30
        while time.monotonic() - start < 10:
            nodes = {n.node_id: n for n in stub.GetLoads(g.GetLoadsRequest(), metadata=ADMIN, timeout=10).nodes}
            if not nodes["prefill-0"].healthy:
                break
        assert not nodes["prefill-0"].healthy and nodes["prefill-1"].healthy
    finally:
        stack.kill("prefill-0", signal.SIGCONT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        nodes = {n.node_id: n for n in stub.GetLoads(g.GetLoadsRequest(), metadata=ADMIN, timeout=10).nodes}
        if nodes["prefill-0"].healthy:
            break
        time.sleep(0.3)
    assert nodes["prefill-0"].healthy  # back once it answers again
    assert_idle(stub)


@pytest.mark.timeout(300)
def test_f6_frozen_decode_mid_stream_ends_within_seconds(stack, stub, expected):
    req = greedy_request(TEXT, 480)
    req.stopping.ignore_eos = True
    stream = stub.GenerateStream(req, metadata=USER1, timeout=120)
    first = next(stream)
    loads = stub.GetLoads(g.GetLoadsRequest(), metadata=ADMIN, timeout=5)
    victim = next(n.node_id for n in loads.nodes if any(i.startswith(first.request_id) for i in n.load.request_ids)
                  and n.role == "decode")
    stack.kill(victim, signal.SIGSTOP)
    start = time.monotonic()
    try:
        try:
            chunks = list(stream)
            assert chunks[-1].finish_reason  # moved to the other decode node and finished
        except grpc.RpcError as err:
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert time.monotonic() - start < 20
        bystanders_ok(stub, expected)
    finally:
        stack.kill(victim, signal.SIGCONT)
    assert_idle(stub, timeout=30)


@pytest.mark.timeout(300)
def test_router_sigterm_refuses_new_calls_and_ends_streams_clearly(stack, stub):
    req = greedy_request(TEXT, 480)
    req.stopping.ignore_eos = True
    stream = stub.GenerateStream(req, metadata=USER1, timeout=60)
    next(stream)
    stack.kill("router", signal.SIGTERM)
    time.sleep(0.5)
    assert _code(lambda: stub.Generate(greedy_request(TEXT, 4), metadata=USER1, timeout=10)) == \
        grpc.StatusCode.UNAVAILABLE
    try:
        assert list(stream)[-1].finish_reason == g.FinishReason.FINISH_REASON_LENGTH  # finished within the grace
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
