"""KV transfer framing and validation: round trips are byte-exact for fp32/bf16/fp16, forged
traffic is rejected before anything is allocated, and a real decode node answers junk on PushKV
with INVALID_ARGUMENT without touching its blocks."""
from __future__ import annotations

import pickle
import zlib

import grpc
import pytest
import torch

from engine.kv_transfer import KVSpec, KVStaging, TransferError, plan_frames
from engine.kv_transfer.base import MAX_FRAME_BYTES, FramePlan, sum64
from engine.kv_transfer.grpc_transport import grpc_frames
from protos.pdserve.v1 import node_pb2, node_pb2_grpc
from tests.services.test_nodes import start_node

SPEC = KVSpec(num_layers=3, block_size=16, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def random_kv(spec: KVSpec, num_blocks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, num_blocks, *spec.block_shape)
    return (torch.randn(shape, generator=g).to(spec.dtype), torch.randn(shape, generator=g).to(spec.dtype))


def frames_for(spec: KVSpec, num_blocks: int, reservation="r", max_frame_bytes=None, seed=0):
    k, v = random_kv(spec, num_blocks, seed)
    return k, v, list(grpc_frames(reservation, spec, k, v, max_frame_bytes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_frame_bytes", [MAX_FRAME_BYTES, 3000])
def test_grpc_framing_round_trip_is_byte_exact(dtype, max_frame_bytes):
    spec = KVSpec(3, 16, 2, 8, dtype)
    k, v, frames = frames_for(spec, 5, max_frame_bytes=max_frame_bytes)
    assert all(len(f.data) <= max(max_frame_bytes, spec.block_bytes) for f in frames)
    assert len(frames) == len(plan_frames(spec, 5, max_frame_bytes))
    staging = KVStaging("r", spec, 5)
    for frame in frames:
        assert not staging.complete
        staging.add_frame(frame)
    assert staging.complete
    k2, v2 = staging.tensors()
    assert k2.dtype == dtype and torch.equal(k2.view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(v2.view(torch.uint8), v.view(torch.uint8))
    assert staging.bytes_received == 2 * k.numel() * k.element_size()


def test_frames_are_at_most_max_frame_bytes():
    assert MAX_FRAME_BYTES == 8 * 2**20
    spec = KVSpec(2, 16, 8, 128, torch.float32)  # 64 KiB per block and layer
    plan = plan_frames(spec, 200)  # 12.5 MiB per layer: split along blocks
    assert {n for *_, n in plan} == {128, 72}  # 128 blocks = 8 MiB, then the rest
    assert len(plan) == 2 * 2 * 2 and all(p.layers == 1 for p in plan)
    assert plan_frames(spec, 100) == [FramePlan(kind, layer, 0, 100) for kind in (0, 1) for layer in (0, 1)]
    # small layers travel several to a frame: 10 blocks = 640 KiB, 12 layers per 8 MiB frame
    deep = KVSpec(16, 16, 8, 128, torch.float32)
    plan = plan_frames(deep, 10)
    assert [(p.kind, p.layer, p.layers) for p in plan] == [(k, first, min(12, 16 - first)) for k in (0, 1)
                                                           for first in (0, 12)]
    assert all(p.layers * p.n * deep.block_bytes <= MAX_FRAME_BYTES for p in plan)


@pytest.mark.parametrize("num_blocks", [3, 10])
def test_multi_layer_frames_round_trip_and_are_validated(num_blocks):
    spec = KVSpec(6, 16, 2, 8, torch.bfloat16)  # 512 B per block and layer
    k, v, frames = frames_for(spec, num_blocks, max_frame_bytes=4 * num_blocks * spec.block_bytes)
    assert [f.header.num_layers for f in frames] == [4, 2, 4, 2]
    staging = KVStaging("r", spec, num_blocks)
    for frame in frames:
        staging.add_frame(frame)
    assert staging.complete and torch.equal(staging.tensors()[0].view(torch.uint8), k.view(torch.uint8))
    assert torch.equal(staging.tensors()[1].view(torch.uint8), v.view(torch.uint8))
    for mutate, match in ((lambda f: setattr(f.header, "num_layers", 7), "out of range"),
                          (lambda f: setattr(f.header, "block_start", 1), "reserved block"),
                          (lambda f: f.header.shape.__setitem__(0, num_blocks - 1), "every reserved block")):
        bad = node_pb2.KVFrame()
        bad.CopyFrom(frames[0])
        mutate(bad)
        fresh = KVStaging("r", spec, num_blocks)
        with pytest.raises(TransferError, match=match):
            fresh.add_frame(bad)
        assert fresh.k is None


def test_pipelined_accept_and_fill_equal_add_frame():
    """The receiver's path (header on the loop, CRC + copy on a worker) lands the same bytes and
    still refuses a bad CRC before the transfer can complete."""
    k, v, frames = frames_for(SPEC, 5, max_frame_bytes=3 * SPEC.block_bytes)
    staging = KVStaging("r", SPEC, 5)
    for frame in frames:
        staging.landed(staging.fill(frame, staging.accept(frame)))
    assert staging.complete and torch.equal(staging.tensors()[0], k) and torch.equal(staging.tensors()[1], v)
    staging = KVStaging("r", SPEC, 5)
    bad = node_pb2.KVFrame()
    bad.CopyFrom(frames[-1])
    bad.header.crc32 ^= 1
    for frame in frames[:-1]:
        staging.landed(staging.fill(frame, staging.accept(frame)))
    slot = staging.accept(bad)
    with pytest.raises(TransferError, match="CRC32"):
        staging.fill(bad, slot)
    assert not staging.complete
    with pytest.raises(TransferError):
        staging.tensors()


@pytest.mark.parametrize("max_frame_bytes", [3 * SPEC.block_bytes, MAX_FRAME_BYTES])
def test_receiver_writes_each_frame_into_its_blocks_as_it_lands(max_frame_bytes):
    """With `write_part`, every frame goes into its own reserved blocks (a real CPU model runner's
    cache, scattered block ids) as soon as its CRC passed; the cache then equals a whole-transfer
    `write_blocks`, and `write` is never called. A bad CRC stops the transfer with nothing reported
    complete."""
    import asyncio

    from engine.kv_transfer.base import KVLanding
    from engine.kv_transfer.grpc_transport import GrpcKVReceiver
    from engine.model_runner import ModelRunner

    def runner():
        r = ModelRunner.__new__(ModelRunner)  # only the cache geometry and the write methods are used
        r.device, r.dtype, r.kv_dtype, r.block_size = torch.device("cpu"), SPEC.dtype, SPEC.dtype, SPEC.block_size
        r.shape = type("Shape", (), {"num_layers": SPEC.num_layers, "num_kv_heads": SPEC.num_kv_heads,
                                     "head_dim": SPEC.head_dim})()
        r.kv_caches = [(torch.zeros(12, *SPEC.block_shape), torch.zeros(12, *SPEC.block_shape))
                       for _ in range(SPEC.num_layers)]
        return r

    block_ids = [9, 2, 7, 0, 11]
    k, v, frames = frames_for(SPEC, 5, max_frame_bytes=max_frame_bytes)
    direct, whole = runner(), runner()
    whole.write_blocks(block_ids, k, v)
    parts, wrote = [], []

    def write_part(kind, layer, start, n, data):
        parts.append((kind, layer, start, n))
        direct.write_block_range(block_ids[start:start + n], kind, layer, data)

    async def write(k_, v_):
        wrote.append(1)

    async def frames_of(items):
        for f in items:
            yield f

    landing = KVLanding("r", SPEC, 5, progress=lambda: None, write=write, write_part=write_part)
    got = asyncio.run(GrpcKVReceiver(torch.device("cpu")).receive(landing, frames_of(frames), None))
    assert got.frames == len(frames) and not wrote and len(parts) == len(frames)
    for (dk, dv), (wk, wv) in zip(direct.kv_caches, whole.kv_caches):
        assert torch.equal(dk, wk) and torch.equal(dv, wv)
    assert direct.kv_caches[0][0][block_ids].abs().sum() > 0
    bad = node_pb2.KVFrame()
    bad.CopyFrom(frames[-1])
    bad.header.crc32 ^= 1
    with pytest.raises(TransferError, match="CRC32"):
        asyncio.run(GrpcKVReceiver(torch.device("cpu")).receive(
            KVLanding("r", SPEC, 5, progress=lambda: None, write=write, write_part=write_part),
            frames_of(frames[:-1] + [bad]), None))
    with pytest.raises(ValueError, match="does not match"):
        direct.write_block_range([1, 2], 0, SPEC.num_layers - 1, torch.zeros(2, 2, *SPEC.block_shape))


def test_incomplete_transfer_is_never_usable():
    _, _, frames = frames_for(SPEC, 4)
    staging = KVStaging("r", SPEC, 4)
    for frame in frames[:-1]:
        staging.add_frame(frame)
    assert not staging.complete
    with pytest.raises(TransferError):
        staging.tensors()


def forged(mutate, num_blocks=4, at=0):
    """Feeds frames up to `at`, then frame `at` changed by `mutate`; returns the staging."""
    _, _, frames = frames_for(SPEC, num_blocks, max_frame_bytes=2 * SPEC.block_bytes)
    staging = KVStaging("r", SPEC, num_blocks)
    for frame in frames[:at]:
        staging.add_frame(frame)
    bad = node_pb2.KVFrame()
    bad.CopyFrom(frames[at])
    mutate(bad, frames)
    return staging, bad


def _set_shape(shape):
    def mutate(f, _):
        del f.header.shape[:]
        f.header.shape.extend(shape)
    return mutate


FORGERIES = {
    "foreign reservation": lambda f, _: setattr(f, "reservation_id", "someone-else"),
    "out-of-range block": lambda f, _: setattr(f.header, "block_start", 3),
    "block far out of range": lambda f, _: setattr(f.header, "block_start", 2**31),
    "out-of-range layer": lambda f, _: setattr(f.header, "layer", 3),
    "bad kind": lambda f, _: setattr(f.header, "kind", 2),
    "replayed seq": lambda f, frames: f.CopyFrom(frames[0]),
    "skipped seq": lambda f, _: setattr(f, "seq", f.seq + 1),
    "wrong total": lambda f, _: setattr(f, "total_frames", f.total_frames + 1),
    "total over the reservation": lambda f, _: setattr(f, "total_frames", 10**6),
    "shape product overflows": _set_shape([2**32 - 1] * 4),
    "shape of another model": _set_shape([2, 16, 4, 8]),
    "shape larger than reserved": _set_shape([5, 16, 2, 8]),
    "dtype mismatch": lambda f, _: setattr(f.header, "dtype", "bfloat16"),
    "unknown dtype": lambda f, _: setattr(f.header, "dtype", "object"),
    "bad crc": lambda f, _: setattr(f.header, "crc32", f.header.crc32 ^ 1),
    "flipped payload bit": lambda f, _: setattr(f, "data", bytes([f.data[0] ^ 1]) + f.data[1:]),
    "short payload": lambda f, _: setattr(f, "data", f.data[:-4]),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_frames_are_rejected_before_allocation(name):
    at = 1 if name in ("replayed seq", "wrong total") else 0
    staging, bad = forged(FORGERIES[name], at=at)
    allocated = staging.k
    if at == 0:
        assert allocated is None
    with pytest.raises(TransferError):
        staging.add_frame(bad)
    assert staging.k is allocated  # nothing (re)allocated for the forged frame
    assert staging.frames == at and not staging.complete


def test_last_frame_with_missing_blocks_is_wrong_total():
    _, _, frames = frames_for(SPEC, 4, max_frame_bytes=2 * SPEC.block_bytes)
    staging = KVStaging("r", SPEC, 4)
    short = [node_pb2.KVFrame() for _ in frames[:3]]
    for f, src in zip(short, frames):
        f.CopyFrom(src)
        f.total_frames = 3  # claims 3 frames, but 3 frames do not cover every block
    staging.add_frame(short[0])
    staging.add_frame(short[1])
    with pytest.raises(TransferError, match="missing"):
        staging.add_frame(short[2])
    assert not staging.complete


def test_header_only_frame_checks_crc_of_received_payload():
    spec = SPEC
    staging = KVStaging("r", spec, 2)
    k, v = random_kv(spec, 2)
    payload = k[0].contiguous().view(torch.uint8).reshape(-1)
    header = node_pb2.TensorHeader(kind=0, layer=0, block_start=0, dtype="float32", shape=[2, 16, 2, 8],
                                   crc32=zlib.crc32(payload.numpy().tobytes()))
    frame = node_pb2.KVFrame(reservation_id="r", seq=0, total_frames=6, header=header)
    buf, token = staging.receive_buffer(frame)
    assert buf.numel() == payload.numel()
    buf.copy_(payload)
    buf[0] ^= 1  # corrupted on the wire
    with pytest.raises(TransferError, match="CRC32"):
        staging.add_received(buf, token)
    with pytest.raises(TransferError, match="no payload"):
        staging.receive_buffer(node_pb2.KVFrame(reservation_id="r", seq=0, total_frames=6, header=header, data=b"x"))



def test_header_only_frame_checks_sum64_when_the_sender_set_it():
    """torch.distributed frames from a GPU carry `sum64` (computed on the device) instead of a
    CRC32: the receiver checks that one, and a flipped bit is caught."""
    staging = KVStaging("r", SPEC, 2)
    k, _ = random_kv(SPEC, 2)
    payload = k[0].contiguous().view(torch.uint8).reshape(-1)
    header = node_pb2.TensorHeader(kind=0, layer=0, block_start=0, dtype="float32", shape=[2, 16, 2, 8],
                                   sum64=sum64(payload))
    frame = node_pb2.KVFrame(reservation_id="r", seq=0, total_frames=6, header=header)
    buf, token = staging.receive_buffer(frame)
    buf.copy_(payload)
    buf[5] ^= 4
    with pytest.raises(TransferError, match="sum64"):
        staging.add_received(buf, token)
    staging = KVStaging("r", SPEC, 2)
    buf, token = staging.receive_buffer(frame)
    buf.copy_(payload)
    staging.add_received(buf, token)  # intact: accepted although crc32 is 0
    assert staging.frames == 1

# ---- a real decode node ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decode(make_tiny_model):
    node = start_node("decode", make_tiny_model("llama"))
    yield node
    assert node.stop() == 0


def raw_push(channel, payloads: list[bytes]):
    call = channel.stream_unary("/pdserve.v1.DecodeNode/PushKV", request_serializer=lambda b: b,
                                response_deserializer=node_pb2.PushKVResponse.FromString)
    return call(iter(payloads), timeout=5)


@pytest.mark.timeout(300)
def test_junk_on_push_kv_is_invalid_argument_without_side_effects(decode):
    with decode.channel() as ch:
        stub = node_pb2_grpc.DecodeNodeStub(ch)
        res = stub.Reserve(node_pb2.ReserveRequest(request_id="victim", num_prompt_tokens=30, lease_ms=20_000),
                           timeout=5)
        before = decode.load()
        blobs = {
            "pickle": pickle.dumps({"reservation_id": res.reservation_id, "data": torch.zeros(4)}),
            "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                    dtype=torch.uint8).numpy().tobytes(),
        }
        for name, blob in blobs.items():
            with pytest.raises(grpc.RpcError) as err:
                raw_push(ch, [blob])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        # frames naming a reservation that does not exist
        spec = KVSpec.from_proto(res.layout)
        _, _, frames = frames_for(spec, 2, reservation="not-a-reservation")
        with pytest.raises(grpc.RpcError) as err:
            stub.PushKV(iter(frames), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # forged frames for the real reservation: wrong dtype, then a block outside it
        _, _, frames = frames_for(KVSpec(spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                         torch.bfloat16), 2, reservation=res.reservation_id)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushKV(iter(frames), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dtype" in err.value.details()
        _, _, frames = frames_for(spec, 2, reservation=res.reservation_id)
        frames[0].header.block_start = 1
        with pytest.raises(grpc.RpcError) as err:
            stub.PushKV(iter(frames), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = decode.load()
        assert (after.free_blocks, list(after.request_ids), after.active_leases) == \
               (before.free_blocks, list(before.request_ids), before.active_leases)
        # the reservation still takes a correct transfer afterwards, and a replay of it is refused
        _, _, frames = frames_for(spec, 2, reservation=res.reservation_id)
        reply = stub.PushKV(iter(frames), timeout=5)
        assert reply.frames == len(frames) and reply.bytes_received == sum(len(f.data) for f in frames)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushKV(iter(frames), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already complete" in err.value.details()
        assert stub.Abort(node_pb2.NodeAbortRequest(request_id="victim"), timeout=5).found
    load = decode.wait_idle()
    assert load.free_blocks == load.total_blocks and not load.request_ids
