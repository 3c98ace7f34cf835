"""Budgets that fit the work (issue 11 item 5): the lease and the KV wait measure silence, not work.
A slow but progressing transfer far longer than both succeeds; a peer that dies (or stalls) before,
during or after the transfer costs one clear status, no traceback, and free == total blocks."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import torch

from engine.kv_transfer import KVSpec
from engine.rpc import convert
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc
from tests.services.test_kv_transfer import frames_for
from tests.services.test_nodes import start_node

FR = generation_pb2.FinishReason
LEASE_MS = 600


def greedy(max_tokens: int = 4):
    return convert.params_to_proto(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def assert_idle(node) -> None:
    load = node.wait_idle()
    assert load.free_blocks == load.total_blocks and not load.request_ids and load.active_leases == 0, load


def decode_tokens(d, rid: str, res, n: int, kv_wait_ms: int, box: dict) -> None:
    """Runs Decode into `box` (tokens, or the error code)."""
    try:
        tokens = []
        for ev in d.Decode(node_pb2.DecodeRequest(request_id=rid, reservation_id=res.reservation_id,
                                                  prompt_token_ids=list(range(10, 10 + n)), first_token_id=5,
                                                  params=greedy(), kv_wait_ms=kv_wait_ms), timeout=30):
            tokens.extend(ev.token_ids)
        box["tokens"] = tokens
    except grpc.RpcError as exc:
        box["error"] = (exc.code(), exc.details())


@pytest.mark.timeout(300)
def test_throttled_transfer_far_longer_than_lease_and_kv_wait_succeeds(nodes):
    """12 frames, one every 0.3 s (~3.6 s) against a 0.6 s lease and a 0.6 s KV wait: every frame
    renews both, so the transfer completes and Decode generates."""
    _, decode = nodes
    with decode.channel() as ch:
        d = node_pb2_grpc.DecodeNodeStub(ch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id="slow", num_prompt_tokens=40, lease_ms=LEASE_MS), timeout=5)
        assert res.lease_ms == LEASE_MS
        spec = KVSpec.from_proto(res.layout)
        _, _, frames = frames_for(spec, res.num_blocks, reservation=res.reservation_id, max_frame_bytes=spec.block_bytes)
        assert len(frames) == 12

        def throttled():
            for frame in frames:
                time.sleep(0.3)
                yield frame
        box: dict = {}
        decoder = threading.Thread(target=decode_tokens, args=(d, "slow", res, 40, LEASE_MS, box))
        start = time.monotonic()
        decoder.start()
        reply = d.PushKV(throttled(), timeout=30)
        decoder.join(30)
        assert time.monotonic() - start > 5 * LEASE_MS / 1000
        assert reply.frames == 12 and reply.bytes_received == spec.transfer_bytes(res.num_blocks)
        assert "error" not in box, box
        assert len(box["tokens"]) == 3  # max_tokens 4: the first came from the prefill side
    assert_idle(decode)


@pytest.mark.timeout(300)
def test_sender_that_stalls_mid_transfer_frees_the_reservation(nodes):
    """During: half the frames, then silence with the stream open. The KV wait and the lease run
    out after 0.6 s without progress: Decode fails UNAVAILABLE and the blocks come back."""
    _, decode = nodes
    with decode.channel() as ch:
        d = node_pb2_grpc.DecodeNodeStub(ch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id="stall", num_prompt_tokens=40, lease_ms=LEASE_MS),
                        timeout=5)
        spec = KVSpec.from_proto(res.layout)
        _, _, frames = frames_for(spec, res.num_blocks, reservation=res.reservation_id, max_frame_bytes=spec.block_bytes)
        release = threading.Event()

        def stalls():
            yield from frames[:6]
            release.wait(20)  # the stream stays open, nothing more arrives
        push = d.PushKV.future(stalls(), timeout=30)
        box: dict = {}
        t0 = time.monotonic()
        decode_tokens(d, "stall", res, 40, LEASE_MS, box)
        waited = time.monotonic() - t0
        release.set()
        with pytest.raises(grpc.RpcError) as err:
            push.result(timeout=30)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.CANCELLED), err.value
        code, details = box["error"]
        assert code == grpc.StatusCode.UNAVAILABLE and "no progress" in details, box
        assert waited < 5
    assert_idle(decode)


@pytest.fixture
def victim(model_dir):
    """A node of the given role that the test may kill."""
    started = []

    def start(role: str):
        node = start_node(role, model_dir)
        started.append(node)
        return node
    yield start
    for node in started:
        node.stop()


@pytest.mark.timeout(300)
def test_decode_node_dead_before_the_transfer(nodes, victim):
    """Before: the decode node dies after Reserve. The prefill node streams the first token, then
    the transfer fails UNAVAILABLE in one log line (no traceback), and its blocks are free."""
    prefill, _ = nodes
    decode = victim("decode")
    with decode.channel() as dch:
        res = node_pb2_grpc.DecodeNodeStub(dch).Reserve(
            node_pb2.ReserveRequest(request_id="orphaned", num_prompt_tokens=40, lease_ms=20_000), timeout=5)
    decode.proc.send_signal(signal.SIGKILL)
    decode.proc.wait(10)
    target = node_pb2.KVTarget(decode_address=decode.address, reservation_id=res.reservation_id, layout=res.layout,
                               transport=node_pb2.KV_TRANSPORT_GRPC, kv_lanes=res.kv_lanes)  # both lanes fail
    events = []
    with prefill.channel() as pch, pytest.raises(grpc.RpcError) as err:
        for ev in node_pb2_grpc.PrefillNodeStub(pch).Prefill(node_pb2.PrefillRequest(
                request_id="orphaned", prompt_token_ids=list(range(10, 50)), params=greedy(), target=target),
                timeout=30):
            events.append(ev.WhichOneof("event"))
    assert events == ["first_token"]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "KV transfer" in err.value.details()
    assert_idle(prefill)
    time.sleep(0.2)
    log = "".join(prefill.stderr)
    assert "Traceback" not in log and "InvalidStateError" not in log
    assert sum("orphaned" in line or "KV transfer to the decode node failed" in line
               for line in log.splitlines()) == 1


@pytest.mark.timeout(300)
def test_prefill_node_dead_after_the_transfer(nodes, victim, model_dir):
    """After: the KV arrived, then the prefill node dies before Decode starts. The KV is complete,
    so Decode still generates (greedy == the same request through live nodes) and frees."""
    _, decode = nodes
    prefill = victim("prefill")
    ids = list(range(200, 240))
    with prefill.channel() as pch, decode.channel() as dch:
        d = node_pb2_grpc.DecodeNodeStub(dch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id="after", num_prompt_tokens=len(ids), lease_ms=20_000),
                        timeout=5)
        target = node_pb2.KVTarget(decode_address=decode.address, reservation_id=res.reservation_id,
                                   layout=res.layout, transport=node_pb2.KV_TRANSPORT_GRPC, kv_lanes=res.kv_lanes)
        events = list(node_pb2_grpc.PrefillNodeStub(pch).Prefill(node_pb2.PrefillRequest(
            request_id="after", prompt_token_ids=ids, params=greedy(8), target=target), timeout=30))
        assert [e.WhichOneof("event") for e in events] == ["first_token", "transfer_done"]
        prefill.proc.send_signal(signal.SIGKILL)
        prefill.proc.wait(10)
        tokens = [events[0].first_token.token_id]
        for ev in d.Decode(node_pb2.DecodeRequest(request_id="after", reservation_id=res.reservation_id,
                                                  prompt_token_ids=ids, first_token_id=tokens[0], params=greedy(8),
                                                  kv_wait_ms=2000), timeout=30):
            tokens.extend(ev.token_ids)
    from engine.llm import LLM
    want = LLM(str(model_dir), num_gpu_blocks=16, max_model_len=256).generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].token_ids
    assert tokens == list(want)
    assert_idle(decode)


def test_spec_transfer_bytes_counts_k_and_v_of_every_layer():
    spec = KVSpec(32, 16, 8, 128, torch.bfloat16)  # Llama-3-8B: 128 KiB of KV per token
    assert spec.transfer_bytes(7168 // 16) == 7168 * 128 * 1024
