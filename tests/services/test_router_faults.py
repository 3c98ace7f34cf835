"""Faults through the router with real processes: client cancel at several points, kill -9 of a
decode node mid-stream and of a prefill node, then the invariants (free == total blocks, no
request id anywhere) on the surviving nodes."""
from __future__ import annotations

import signal
import time

import grpc
import pytest

from protos.pdserve.v1 import generation_pb2 as g
from tests.services.helpers import assert_idle, greedy_request
from tests.services.stack import pid_alive, port_open, start_stack

LONG = "one two three four five six seven eight nine ten " * 6


@pytest.fixture(scope="module")
def stack(make_tiny_model):
    # --max-failovers 0: a decode node's death mid-stream must end the stream with UNAVAILABLE (the
    # failover that moves it instead is tested in test_placement.py)
    with start_stack(make_tiny_model("llama"), num_prefill=2, num_decode=2, extra_args=("--max-failovers", "0")) as s:
        yield s
    assert all(not pid_alive(pid) for pid in s.processes.values())
    assert not port_open(s.router_address)


def _long_request(max_tokens=100):
    req = greedy_request(LONG, max_tokens)
    req.stopping.ignore_eos = True
    return req


@pytest.mark.timeout(120)
def test_cancel_at_each_phase_frees_everything(stack):
    stub = stack.stub()
    for delay in (0.0, 0.005, 0.02, 0.1):  # before/while prefilling, around the transfer, while decoding
        call = stub.GenerateStream(_long_request(), timeout=60)
        time.sleep(delay)
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    call = stub.GenerateStream(_long_request(), timeout=60)
    first = next(call)  # mid-decode
    assert first.token_ids
    call.cancel()
    assert_idle(stub)
    # Abort by the client's label ends the request with FINISH_REASON_ABORTED
    req = _long_request(180)
    req.client_request_id = "mine"
    stream = stub.GenerateStream(req, timeout=60)
    next(stream)
    assert stub.Abort(g.AbortRequest(request_id="mine"), timeout=5).aborted == 1
    assert list(stream)[-1].finish_reason == g.FinishReason.FINISH_REASON_ABORTED
    # timeout_ms -> FINISH_REASON_TIME_LIMIT
    req = _long_request(180)
    req.timeout_ms = 300
    assert stub.Generate(req, timeout=60).completions[0].finish_reason == g.FinishReason.FINISH_REASON_TIME_LIMIT
    assert_idle(stub)


@pytest.mark.timeout(120)
def test_kill_decode_mid_stream_then_kill_prefill(stack):
    stub = stack.stub()
    streams = [stub.GenerateStream(_long_request(180), timeout=60) for _ in range(2)]
    # past the second token: a failure before it is retried with a fresh attempt (test_rel_pipeline)
    firsts = [[next(s) for _ in range(3)] for s in streams]
    loads = stub.GetLoads(g.GetLoadsRequest(), timeout=5)
    busy = [n.node_id for n in loads.nodes if n.role == "decode" and n.load.request_ids]
    assert busy
    stack.kill(busy[0], signal.SIGKILL)
    codes = []
    for s in streams:
        try:
            chunks = list(s)
            codes.append(chunks[-1].finish_reason)
        except grpc.RpcError as err:
            codes.append(err.code())
    assert grpc.StatusCode.UNAVAILABLE in codes  # never a normal-looking finish for the victim
    assert firsts
    info = {n.node_id: n for n in stub.GetLoads(g.GetLoadsRequest(), timeout=5).nodes}
    assert not info[busy[0]].healthy
    for _ in range(3):  # new requests go to the surviving decode node
        r = stub.Generate(greedy_request(LONG, 4), timeout=60).completions[0]
        assert r.timings.decode_node != busy[0] or r.completion_tokens == 1
    stack.kill("prefill-0", signal.SIGKILL)
    for _ in range(3):  # retried on (or placed on) the other prefill node
        r = stub.Generate(greedy_request(LONG, 4), timeout=60).completions[0]
        assert r.timings.prefill_node == "prefill-1"
    assert_idle(stub)


@pytest.mark.timeout(150)
def test_prefill_killed_with_requests_in_flight_is_retried(make_tiny_model):
    """Requests sitting on a prefill node when it dies are retried on the other one (nothing had
    reached the client yet), with the same greedy output; nothing is left held anywhere."""
    import concurrent.futures

    with start_stack(make_tiny_model("llama"), num_prefill=2, num_decode=1) as s:
        stub = s.stub()
        texts = [f"{LONG} {i}" for i in range(6)]
        expected = [list(stub.Generate(greedy_request(t, 6), timeout=60).completions[0].token_ids) for t in texts]
        s.kill("prefill-0", signal.SIGSTOP)  # frozen: calls placed on it hang until it dies
        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            futures = [pool.submit(stub.Generate, greedy_request(t, 6), timeout=60) for t in texts]
            time.sleep(1.5)
            s.kill("prefill-0", signal.SIGKILL)
            results = [f.result().completions[0] for f in futures]
        assert [list(r.token_ids) for r in results] == expected
        assert all(r.timings.prefill_node == "prefill-1" for r in results)
        # Some of them were stuck on the frozen node for the 1.5 s before its death, then retried.
        assert max(r.timings.e2e_ms for r in results) >= 1400
        assert_idle(stub)
