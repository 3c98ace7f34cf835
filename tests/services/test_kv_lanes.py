"""gRPC KV over several lanes: one transfer as concurrent PushKV calls, each on its own connection
carrying a contiguous range of layers (`--kv-grpc-lanes`). Every lane's frames pass the same checks
as one stream's; the transfer is complete only when every lane is; one bad lane fails the transfer."""
from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest
import torch

from engine.kv_transfer import KVSpec, TransferError
from engine.kv_transfer.base import MAX_KV_LANES, KVLanding, lane_layers, plan_frames, plan_frames_streamed
from engine.kv_transfer.grpc_transport import GrpcKVReceiver, GrpcKVSender, HostKV, LaneSet, decode_frame, encode_frame
from engine.rpc import convert
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import node_pb2, node_pb2_grpc

SPEC = KVSpec(num_layers=5, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def kv(num_blocks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (SPEC.num_layers, num_blocks, *SPEC.block_shape)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("layers,lanes", [(1, 1), (5, 2), (5, 4), (32, 3), (32, 4), (7, 7)])
def test_lane_layers_split_every_layer_once_contiguously(layers, lanes):
    bounds = lane_layers(layers, lanes)
    assert len(bounds) == lanes and bounds[0][0] == 0 and bounds[-1][1] == layers
    assert all(lo < hi for lo, hi in bounds) and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_lane_layers_refuses_more_lanes_than_layers():
    with pytest.raises(ValueError):
        lane_layers(2, 3)
    with pytest.raises(ValueError):
        lane_layers(4, 0)


@pytest.mark.parametrize("planner", [plan_frames, plan_frames_streamed])
@pytest.mark.parametrize("max_frame_bytes", [SPEC.block_bytes, 3 * SPEC.block_bytes, 10**6])
def test_the_lanes_plans_cover_every_block_of_every_layer_once(planner, max_frame_bytes):
    covered = []
    for layers in lane_layers(SPEC.num_layers, 3):
        for p in planner(SPEC, 7, max_frame_bytes, layers):
            assert layers[0] <= p.layer and p.layer + p.layers <= layers[1]
            covered += [(p.kind, layer, b) for layer in range(p.layer, p.layer + p.layers)
                        for b in range(p.start, p.start + p.n)]
    assert sorted(covered) == sorted(itertools.product((0, 1), range(SPEC.num_layers), range(7)))


def lane_frames(k, v, lanes: int, max_frame_bytes: int, reservation: str = "r") -> list[list]:
    """Each lane's frames as the sender serializes them, parsed back as the decode node reads them."""
    host = HostKV.of(k, v)
    out = []
    for lane, layers in enumerate(lane_layers(SPEC.num_layers, lanes)):
        plan = plan_frames(SPEC, k.shape[1], max_frame_bytes, layers)
        out.append([decode_frame(encode_frame(reservation, SPEC, host, plan, seq, lane, lanes))
                    for seq in range(len(plan))])
    return out


async def _aiter(items, gate: asyncio.Event | None = None, after: int | None = None):
    for i, item in enumerate(items):
        if gate is not None and i == after:
            await gate.wait()
        yield item
        await asyncio.sleep(0)


def landing(num_blocks: int, wrote: list):
    async def write(k, v):
        wrote.append((k.clone(), v.clone()))
    return KVLanding("r", SPEC, num_blocks, progress=lambda: None, write=write)


@pytest.mark.parametrize("lanes", [2, 3, 4])
@pytest.mark.parametrize("max_frame_bytes", [3 * SPEC.block_bytes, 10**6])
def test_lanes_in_any_order_land_the_whole_transfer_once(lanes, max_frame_bytes):
    """The lanes run concurrently; only the last to complete writes, and what it writes is the KV."""
    k, v = kv(6)
    per_lane = lane_frames(k, v, lanes, max_frame_bytes)

    async def run():
        wrote = []
        lane_set = LaneSet(landing(6, wrote), lanes, pin_memory=False)
        receiver = GrpcKVReceiver(torch.device("cpu"))
        order = list(reversed(range(lanes)))  # the last lane starts first
        results = await asyncio.gather(*(receiver.receive_lane(lane_set, lane, _aiter(per_lane[lane]))
                                         for lane in order))
        return wrote, results, lane_set
    wrote, results, lane_set = asyncio.run(run())
    assert len(wrote) == 1 and torch.equal(wrote[0][0], k) and torch.equal(wrote[0][1], v)
    assert sum(last for _, last in results) == 1 and lane_set.finished and lane_set.ended
    assert sum(got.frames for got, _ in results) == sum(map(len, per_lane))
    assert lane_set.bytes == SPEC.transfer_bytes(6)


def test_a_transfer_with_a_missing_lane_is_never_complete():
    k, v = kv(3)
    per_lane = lane_frames(k, v, 3, 10**6)

    async def run():
        wrote = []
        lane_set = LaneSet(landing(3, wrote), 3, pin_memory=False)
        receiver = GrpcKVReceiver(torch.device("cpu"))
        lasts = [(await receiver.receive_lane(lane_set, lane, _aiter(per_lane[lane])))[1] for lane in (0, 2)]
        return wrote, lasts, lane_set
    wrote, lasts, lane_set = asyncio.run(run())
    assert wrote == [] and lasts == [False, False] and not lane_set.finished and not lane_set.ended


def _forged(frame, **changes):
    msg = node_pb2.KVFrame(reservation_id=frame.reservation_id, seq=frame.seq, total_frames=frame.total_frames,
                           header=frame.header, data=bytes(frame.data), lane=frame.lane, lanes=frame.lanes)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize("case,why", [("other lane's layers", "not this lane's"),
                                      ("lane field differs", "in the stream of lane 0 of 2"),
                                      ("lanes field differs", "lane 0 of 3 in the stream"),
                                      ("duplicate lane", "arrived twice"),
                                      ("lane past the last", "lane 2 of a transfer over 2 lanes")])
def test_forged_lanes_are_refused(case, why):
    k, v = kv(2)
    per_lane = lane_frames(k, v, 2, 10**6)

    async def run():
        lane_set = LaneSet(landing(2, []), 2, pin_memory=False)
        receiver = GrpcKVReceiver(torch.device("cpu"))
        if case == "other lane's layers":  # lane 0's stream carrying lane 1's frames, relabelled
            return await receiver.receive_lane(lane_set, 0, _aiter([_forged(f, lane=0) for f in per_lane[1]]))
        if case == "lane field differs":
            return await receiver.receive_lane(lane_set, 0, _aiter([per_lane[0][0], _forged(per_lane[0][1], lane=1)]))
        if case == "lanes field differs":
            return await receiver.receive_lane(lane_set, 0, _aiter([_forged(per_lane[0][0], lanes=3)]))
        if case == "duplicate lane":
            await receiver.receive_lane(lane_set, 0, _aiter(per_lane[0]))
            return await receiver.receive_lane(lane_set, 0, _aiter(per_lane[0]))
        return await receiver.receive_lane(lane_set, 2, _aiter(per_lane[0]))
    with pytest.raises(TransferError, match=why):
        asyncio.run(run())


@pytest.mark.parametrize("lanes", [1, MAX_KV_LANES + 1, SPEC.num_layers + 1])
def test_a_lane_count_the_node_does_not_take_is_refused(lanes):
    with pytest.raises(TransferError, match="lanes"):
        LaneSet(landing(2, []), lanes, pin_memory=False)


def test_a_failed_lane_fails_the_others_at_their_next_frame():
    """Lane 0 carries a bad CRC; lane 1, held back until then, stops at its next frame, and the
    transfer ends (a new one may start), nothing written."""
    k, v = kv(4)
    per_lane = lane_frames(k, v, 2, SPEC.block_bytes)
    bad = _forged(per_lane[0][1])
    bad.header.crc32 ^= 1
    per_lane[0][1] = bad

    async def run():
        wrote = []
        lane_set = LaneSet(landing(4, wrote), 2, pin_memory=False)
        receiver = GrpcKVReceiver(torch.device("cpu"))
        gate = asyncio.Event()

        async def lane0():
            try:
                return await receiver.receive_lane(lane_set, 0, _aiter(per_lane[0]))
            finally:
                gate.set()
        results = await asyncio.gather(lane0(), receiver.receive_lane(lane_set, 1, _aiter(per_lane[1], gate, 2)),
                                       return_exceptions=True)
        return wrote, results, lane_set
    wrote, results, lane_set = asyncio.run(run())
    assert isinstance(results[0], TransferError) and "CRC32" in str(results[0])
    assert isinstance(results[1], TransferError) and "another lane" in str(results[1])
    assert wrote == [] and lane_set.ended and not lane_set.finished


def test_sender_uses_the_lanes_both_sides_take():
    sender = GrpcKVSender(lanes=3)
    layout = SPEC.to_proto()
    assert sender.lanes_for(node_pb2.KVTarget(layout=layout, kv_lanes=4), SPEC) == 3
    assert sender.lanes_for(node_pb2.KVTarget(layout=layout, kv_lanes=2), SPEC) == 2
    assert sender.lanes_for(node_pb2.KVTarget(layout=layout), SPEC) == 1  # a decode node without lanes
    two_layers = KVSpec(2, 4, 2, 8, torch.float32)
    assert sender.lanes_for(node_pb2.KVTarget(layout=two_layers.to_proto(), kv_lanes=4), two_layers) == 2
    with pytest.raises(ValueError):
        GrpcKVSender(lanes=MAX_KV_LANES + 1)


# ---- a real decode node ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decode(make_tiny_model):
    from tests.services.test_nodes import start_node
    node = start_node("decode", make_tiny_model("llama"))
    yield node
    assert node.stop() == 0


def _node_lane_frames(spec: KVSpec, num_blocks: int, reservation: str, lanes: int) -> list[list]:
    g = torch.Generator().manual_seed(3)
    shape = (spec.num_layers, num_blocks, *spec.block_shape)
    host = HostKV.of(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    out = []
    for lane, layers in enumerate(lane_layers(spec.num_layers, lanes)):
        plan = plan_frames(spec, num_blocks, spec.block_bytes, layers)
        out.append([node_pb2.KVFrame.FromString(encode_frame(reservation, spec, host, plan, seq, lane, lanes))
                    for seq in range(len(plan))])
    return out


@pytest.mark.timeout(300)
def test_decode_node_takes_lanes_one_after_another_and_refuses_forgeries(decode):
    """Lanes need not overlap in time: lane 1 alone leaves the KV not ready (a Decode waiting for
    it times out), lane 0 then completes it; a replayed lane, a wrong lane count and a lane of an
    unknown reservation are refused; the node ends idle."""
    with decode.channel() as ch:
        stub = node_pb2_grpc.DecodeNodeStub(ch)
        res = stub.Reserve(node_pb2.ReserveRequest(request_id="lanes", num_prompt_tokens=30, lease_ms=20_000),
                           timeout=5)
        assert res.kv_lanes == 2  # the tiny model's two layers
        spec = KVSpec.from_proto(res.layout)
        per_lane = _node_lane_frames(spec, res.num_blocks, res.reservation_id, 2)
        with pytest.raises(grpc.RpcError) as err:  # more lanes than the node takes
            stub.PushKV(iter([_forged(per_lane[0][0], lanes=3)]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lanes" in err.value.details()
        reply = stub.PushKV(iter(per_lane[1]), timeout=5)
        assert reply.frames == len(per_lane[1])
        with pytest.raises(grpc.RpcError) as err:  # lane 1 again
            stub.PushKV(iter(per_lane[1]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in err.value.details()
        ids = list(range(10, 40))
        params = convert.params_to_proto(SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        with pytest.raises(grpc.RpcError) as err:  # half the KV: Decode does not start on it
            list(stub.Decode(node_pb2.DecodeRequest(request_id="lanes", reservation_id=res.reservation_id,
                                                    prompt_token_ids=ids, first_token_id=5, params=params,
                                                    kv_wait_ms=300), timeout=10))
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        res = stub.Reserve(node_pb2.ReserveRequest(request_id="lanes2", num_prompt_tokens=30, lease_ms=20_000),
                           timeout=5)
        per_lane = _node_lane_frames(spec, res.num_blocks, res.reservation_id, 2)
        assert stub.PushKV(iter(per_lane[1]), timeout=5).frames == len(per_lane[1])
        assert stub.PushKV(iter(per_lane[0]), timeout=5).frames == len(per_lane[0])
        tokens = []
        for ev in stub.Decode(node_pb2.DecodeRequest(request_id="lanes2", reservation_id=res.reservation_id,
                                                     prompt_token_ids=ids, first_token_id=5, params=params,
                                                     kv_wait_ms=2000), timeout=30):
            tokens.extend(ev.token_ids)
        assert len(tokens) == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.PushKV(iter(per_lane[0]), timeout=5)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    load = decode.wait_idle()
    assert load.free_blocks == load.total_blocks and not load.request_ids
