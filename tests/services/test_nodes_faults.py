"""Faults around the nodes: an exception in the model forward (health flips, the process exits
non-zero), transfers that fail or stop half way (nothing decoded from partial KV, everything freed),
and a torch.distributed pair group rebuilt after a failed transfer."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from engine.kv_transfer import KVSpec
from engine.rpc import convert
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import node_pb2, node_pb2_grpc
from tests.services.test_kv_transfer import frames_for
from tests.services.test_nodes import TRANSPORTS, free_port, generate, start_node

POISON = [7, 7, 7, 7]
# Runs a node whose model forward raises once a scheduled prompt starts with POISON (the patch
# lives in the test's launcher, not in the node).
FAULTY_LAUNCHER = f"""
import sys
from engine import model_runner
real = model_runner.ModelRunner.execute
def execute(self, out, specs):
    if any(c.request.prompt_token_ids[:4] == {POISON} for c in out.chunks):
        raise RuntimeError("injected fault in the model forward")
    return real(self, out, specs)
model_runner.ModelRunner.execute = execute
from prefill_node.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def greedy(n=8):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.mark.timeout(300)
def test_exception_in_model_forward_fails_requests_flips_health_and_exits(model_dir):
    node = start_node("prefill", model_dir, launcher=["-c", FAULTY_LAUNCHER])
    try:
        params = convert.params_to_proto(greedy())
        with node.channel() as ch:
            stub = node_pb2_grpc.PrefillNodeStub(ch)
            ok = list(stub.Prefill(node_pb2.PrefillRequest(request_id="fine", prompt_token_ids=[1, 2, 3],
                                                           params=params), timeout=10))
            assert ok[0].first_token.token_id >= 0
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Prefill(node_pb2.PrefillRequest(request_id="boom", prompt_token_ids=POISON + [1],
                                                          params=params), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Traceback" not in err.value.details() and "/" not in err.value.details()
        statuses = []
        end = time.monotonic() + 10
        while node.proc.poll() is None and time.monotonic() < end:
            try:
                statuses.append(node.health())
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        assert node.proc.wait(10) == 1
        assert health_pb2.HealthCheckResponse.SERVING not in statuses
        assert "injected fault" in "".join(node.stderr)  # logged server-side only
    finally:
        node.stop()


@pytest.mark.timeout(300)
def test_transfer_to_unreachable_decode_fails_unavailable_and_releases_kv(nodes):
    prefill, decode = nodes
    layout = KVSpec.from_proto(node_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=16,
                                                 dtype="float32")).to_proto()
    target = node_pb2.KVTarget(decode_address=f"127.0.0.1:{free_port()}", reservation_id="nowhere",
                               transport=node_pb2.KV_TRANSPORT_GRPC, layout=layout)
    with prefill.channel() as ch:
        events = []
        with pytest.raises(grpc.RpcError) as err:
            for ev in node_pb2_grpc.PrefillNodeStub(ch).Prefill(node_pb2.PrefillRequest(
                    request_id="lost", prompt_token_ids=list(range(10, 50)), params=convert.params_to_proto(greedy()),
                    target=target), timeout=10):
                events.append(ev)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [e.WhichOneof("event") for e in events] == ["first_token"]
    load = prefill.wait_idle()
    assert load.free_blocks == load.total_blocks and not load.request_ids


@pytest.mark.timeout(300)
def test_half_a_transfer_is_never_decoded(nodes):
    """The sender dies after half the frames: Decode fails UNAVAILABLE, nothing is generated, and
    the reservation's blocks come back."""
    _, decode = nodes
    with decode.channel() as ch:
        stub = node_pb2_grpc.DecodeNodeStub(ch)
        res = stub.Reserve(node_pb2.ReserveRequest(request_id="half", num_prompt_tokens=40, lease_ms=20_000),
                           timeout=5)
        _, _, frames = frames_for(KVSpec.from_proto(res.layout), res.num_blocks, reservation=res.reservation_id,
                                  max_frame_bytes=2048)

        def dies_half_way():
            yield from frames[: len(frames) // 2]
            raise ConnectionError("prefill node killed")
        with pytest.raises(grpc.RpcError) as err:
            stub.PushKV(dies_half_way(), timeout=5)
        assert err.value.code() == grpc.StatusCode.CANCELLED or err.value.code() == grpc.StatusCode.UNKNOWN
        tokens = []
        with pytest.raises(grpc.RpcError) as err:
            for ev in stub.Decode(node_pb2.DecodeRequest(
                    request_id="half", reservation_id=res.reservation_id, prompt_token_ids=list(range(40)),
                    first_token_id=5, params=convert.params_to_proto(greedy()), kv_wait_ms=500), timeout=5):
                tokens.extend(ev.token_ids)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and tokens == []
    load = decode.wait_idle()
    assert load.free_blocks == load.total_blocks and not load.request_ids


@pytest.mark.timeout(300)
def test_torch_dist_pair_is_rebuilt_after_a_refused_transfer(nodes, model_dir):
    from engine.llm import LLM
    prefill, decode = nodes
    ids = list(range(100, 130))
    want = LLM(str(model_dir), num_gpu_blocks=16, max_model_len=256).generate(
        {"prompt_token_ids": ids}, greedy(), use_tqdm=False)[0].outputs[0].token_ids
    dist = TRANSPORTS["torch_dist"]
    assert generate(prefill, decode, "pair-1", ids, greedy(), dist).token_ids == want
    # a reservation freed before the KV arrives: the decode side refuses, the sender must not wait
    # for a receive that never comes, and drops the pair
    with decode.channel() as dch, prefill.channel() as pch:
        d = node_pb2_grpc.DecodeNodeStub(dch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id="refused", num_prompt_tokens=len(ids), lease_ms=20_000,
                                                transport=dist), timeout=5)
        assert d.Abort(node_pb2.NodeAbortRequest(request_id="refused"), timeout=5).found
        target = node_pb2.KVTarget(decode_address=decode.address, reservation_id=res.reservation_id, transport=dist,
                                   rendezvous=res.rendezvous, decode_node_id=res.node_id, layout=res.layout)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(node_pb2_grpc.PrefillNodeStub(pch).Prefill(node_pb2.PrefillRequest(
                request_id="refused", prompt_token_ids=ids, params=convert.params_to_proto(greedy()), target=target),
                timeout=20))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 5
    assert generate(prefill, decode, "pair-2", ids, greedy(), dist).token_ids == want
    for node in nodes:
        load = node.wait_idle()
        assert load.free_blocks == load.total_blocks and not load.request_ids
