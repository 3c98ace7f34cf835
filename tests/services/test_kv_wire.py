"""The decode node reads PushKV frames from the received bytes (`decode_frame`): the same fields as
protobuf's parser gives, the payload as a view into the message (no copy), malformed bytes refused."""
from __future__ import annotations

import random
import zlib

import pytest
import torch

from engine.kv_transfer import KVSpec, TransferError
from engine.kv_transfer.grpc_transport import HostKV, WireFrame, decode_frame, encode_frame
from engine.kv_transfer.base import crc32, plan_frames, sum64
from protos.pdserve.v1 import node_pb2


def _header(**kw) -> node_pb2.TensorHeader:
    return node_pb2.TensorHeader(kind=1, layer=3, block_start=5, shape=[2, 16, 4, 8], dtype="bfloat16",
                                 crc32=123456789, num_layers=1, **kw)


def _same(wire, msg: node_pb2.KVFrame) -> None:
    assert isinstance(wire, WireFrame)
    assert (wire.reservation_id, wire.seq, wire.total_frames) == (msg.reservation_id, msg.seq, msg.total_frames)
    assert wire.header == msg.header
    assert bytes(wire.data) == msg.data


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 70, b"\x00" * 300_000])
def test_decode_frame_equals_protobuf_parse(payload):
    msg = node_pb2.KVFrame(reservation_id="res-\u00e9", seq=7, total_frames=2**31 + 5, header=_header(), data=payload)
    raw = msg.SerializeToString()
    wire = decode_frame(raw)
    _same(wire, node_pb2.KVFrame.FromString(raw))
    if payload:  # the payload is a view into the received bytes, not a copy
        assert isinstance(wire.data, memoryview) and wire.data.obj is raw


def test_decode_frame_reads_any_field_order_unknown_fields_and_a_repeated_payload():
    rng = random.Random(0)
    parts = [node_pb2.KVFrame(reservation_id="r1").SerializeToString(),
             node_pb2.KVFrame(seq=3).SerializeToString(),
             node_pb2.KVFrame(data=b"first").SerializeToString(),
             node_pb2.KVFrame(total_frames=9).SerializeToString(),
             node_pb2.KVFrame(header=_header()).SerializeToString(),
             bytes([(15 << 3) | 0]) + b"\x96\x01",          # unknown varint field 15
             bytes([(14 << 3) | 5]) + b"abcd",              # unknown fixed32
             bytes([(13 << 3) | 1]) + b"abcdefgh",          # unknown fixed64
             bytes([(12 << 3) | 2, 3]) + b"xyz",            # unknown bytes
             b"\xf8\x07\x01"]                                 # unknown field 127 (a two-byte tag)
    for _ in range(20):
        rng.shuffle(parts)
        raw = b"".join(parts) + node_pb2.KVFrame(data=b"second").SerializeToString()  # the last one wins
        _same(decode_frame(raw), node_pb2.KVFrame.FromString(raw))


def test_decode_frame_of_the_senders_frames():
    spec = KVSpec(2, 4, 2, 8, torch.float16)
    k, v = (torch.randn(2, 3, 4, 2, 8, dtype=torch.float16) for _ in range(2))
    host, plan = HostKV.of(k, v), plan_frames(spec, 3, 256)
    for seq in range(len(plan)):
        raw = encode_frame("r", spec, host, plan, seq)
        _same(decode_frame(raw), node_pb2.KVFrame.FromString(raw))


def test_decode_frame_passes_parsed_messages_through():
    msg = node_pb2.KVFrame(reservation_id="r", data=b"abc")
    assert decode_frame(msg) is msg


@pytest.mark.parametrize("raw, why", [
    (b"\x80", "varint"),                                    # truncated tag
    (b"\x08" + b"\xff" * 11, "varint"),                     # overlong varint
    (bytes([(5 << 3) | 2, 10]) + b"short", "past the end"),  # payload longer than the message
    (bytes([(2 << 3) | 1]) + b"1234", "past the end"),      # fixed64 cut short
    (bytes([(4 << 3) | 3]), "wire type 3"),                 # groups are not KVFrame's
    (bytes([(1 << 3) | 7]), "wire type 7"),
    (b"\x00\x01", "field number 0"),
    (bytes([(4 << 3) | 2, 2]) + b"\xff\xff", "malformed KVFrame"),  # header bytes that are no TensorHeader
])
def test_malformed_frames_are_transfer_errors(raw, why):
    with pytest.raises(TransferError, match=why):
        decode_frame(raw)


def test_random_bytes_never_crash_the_decoder():
    rng = random.Random(1)
    for _ in range(2000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        try:
            frame = decode_frame(raw)
        except TransferError:
            continue
        ref = node_pb2.KVFrame.FromString(raw)  # what decoded must be what protobuf reads
        _same(frame, ref)


def test_frame_crc_is_zlibs_crc32_whichever_library_computes_it():
    """Frames carry zlib's CRC32 (ISA-L computes it when installed): a sender and a receiver of
    either kind agree, on bytes, on views into bytes and on tensors of any dtype."""
    raw = bytes(range(256)) * 4099 + b"tail"
    assert crc32(raw) == zlib.crc32(raw)
    assert crc32(memoryview(raw)[7:-3]) == zlib.crc32(raw[7:-3])
    assert crc32(b"") == 0
    t = torch.arange(1000, dtype=torch.float32).to(torch.bfloat16)
    assert crc32(t) == zlib.crc32(t.view(torch.uint8).numpy().tobytes())


def _sum64_reference(raw: bytes) -> int:
    """sum64 by its definition, in plain Python integers."""
    raw = raw + bytes(-len(raw) % 4)
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
    s1 = sum(words) % 2**32
    s2 = sum((i + 1) * w for i, w in enumerate(words)) % 2**32
    return s1 + (s2 << 32)


@pytest.mark.parametrize("n", [0, 3, 4, 4097, 65536, 70001, 3 * 65536 + 8])
def test_sum64_is_its_definition_and_catches_a_flipped_bit(n):
    """The torch.distributed frames' device-side checksum equals its documented formula (so any
    device and the host agree), on lengths that are and are not whole words or rows, with words
    near 2^32 (the sums must not overflow int64)."""
    g = torch.Generator().manual_seed(n)
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if n >= 8:
        t[:8] = 255  # words of 2^32 - 1
    raw = t.numpy().tobytes()
    assert sum64(t) == _sum64_reference(raw)
    if n >= 8:
        flipped = t.clone()
        flipped[n // 2] ^= 0x10
        assert sum64(flipped) != sum64(t)


def test_sum64_swapped_words_change_it():
    a = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    b = torch.tensor([2, 1, 3, 4], dtype=torch.int32)
    assert sum64(a) & 0xFFFFFFFF == sum64(b) & 0xFFFFFFFF  # same words: S1 agrees
    assert sum64(a) != sum64(b)  # order differs: S2 does not
    assert sum64(torch.tensor([1.5], dtype=torch.bfloat16)) == _sum64_reference(
        torch.tensor([1.5], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sum64_on_the_gpu_equals_the_host():
    t = torch.randint(0, 256, (3 * 2**20 + 5,), dtype=torch.uint8)
    assert sum64(t.cuda()) == sum64(t) == _sum64_reference(t.numpy().tobytes())


def test_torch_dist_payload_checksums_where_the_payload_lies():
    """A host payload (gloo) carries the CRC32; a GPU payload the device-side sum64 (no copy to
    the host for it)."""
    from engine.kv_transfer.torch_dist import _payload
    t = torch.arange(4096, dtype=torch.float32).view(16, 256)
    payload, header = _payload(t, torch.device("cpu"))
    assert not header.HasField("sum64") and header.crc32 == zlib.crc32(payload.numpy().tobytes())
    if torch.cuda.is_available():
        payload, header = _payload(t, torch.device("cuda"))
        assert header.HasField("sum64") and header.sum64 == sum64(t)
