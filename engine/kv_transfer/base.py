"""The transfer interfaces, the KV layout both sides must agree on, transport names, frame planning."""
from __future__ import annotations

import abc
import zlib
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch

from engine.rpc.convert import TRANSPORT_NAMES, TRANSPORTS, T, transport_name  # noqa: F401  (re-exported)
from protos.pdserve.v1 import node_pb2

try:  # ISA-L's CRC32: the same checksum as zlib's, about 3.5x faster (H200 host and this box), GIL released
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # a platform without isal wheels: zlib's (also releases the GIL on large buffers)
    _crc32 = zlib.crc32

MAX_FRAME_BYTES = 8 * 2**20  # payload per PushKV frame (H200, 7k-token 8B KV: 8 MiB 1.71 GB/s, 4 MiB 1.46)
MAX_KV_LANES = 4  # parallel PushKV streams (one connection each) a decode node takes for one transfer
K, V = 0, 1

# KV dtypes by their name on the wire (`KVLayout.dtype`, `TensorHeader.dtype`).
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8,
           "float8_e4m3fn": torch.float8_e4m3fn}  # an fp8 KV cache (--kv-cache-dtype fp8)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name[:32]!r}") from None


@dataclass(frozen=True)
class KVSpec:
    """Geometry and dtype of a node's KV cache (`KVLayout` on the wire)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of_engine(cls, engine) -> "KVSpec":
        s, resolved = engine.shape, engine.resolved
        # The cache's dtype (float8_e4m3fn under --kv-cache-dtype fp8: 1-byte elements on the wire;
        # its scales are static, so equal dtypes mean equal scales).
        return cls(s.num_layers, resolved.block_size, s.num_kv_heads, s.head_dim, resolved.kv_dtype)

    @classmethod
    def from_proto(cls, msg: node_pb2.KVLayout) -> "KVSpec":
        return cls(msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, dtype_from_name(msg.dtype))

    def to_proto(self) -> node_pb2.KVLayout:
        return node_pb2.KVLayout(num_layers=self.num_layers, block_size=self.block_size,
                                 num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                 dtype=dtype_name(self.dtype))

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return self.block_size, self.num_kv_heads, self.head_dim

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.elem_size

    def transfer_bytes(self, num_blocks: int) -> int:
        """Payload bytes of a transfer: K and V of every layer."""
        return 2 * self.num_layers * num_blocks * self.block_bytes

    def check_tensors(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Validates exported KV against this spec; returns its number of blocks."""
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"KV dtype {k.dtype} differs from the target's {self.dtype}")
        expected = (self.num_layers, k.shape[1], *self.block_shape)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KV shape {tuple(k.shape)} does not match the target's layout {expected}")
        return k.shape[1]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor of any dtype (bf16 included), no pickle."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def crc32(t_or_bytes) -> int:
    """CRC32 (zlib's polynomial) of a buffer or of a tensor's raw bytes; releases the GIL."""
    if isinstance(t_or_bytes, torch.Tensor):
        t_or_bytes = memoryview(t_or_bytes.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy())
    return _crc32(t_or_bytes) & 0xFFFFFFFF


_SUM_ROW = 1 << 14  # terms summed per row: a row's sum of terms below 2^49 stays below 2^63


def sum64(t: torch.Tensor) -> int:
    """The torch.distributed frames' checksum (`TensorHeader.sum64`), computed on the tensor's own
    device: its raw bytes as little-endian int32 words w[i] (zero-padded to whole words), S1 =
    sum w[i] and S2 = sum (i + 1) * w[i], each mod 2^32, as S1 + 2^32 * S2. Every partial sum is
    exact in int64 (no overflow), so a GPU and a CPU agree; a flipped bit changes S1, two swapped
    words change S2. Whole rows of `_SUM_ROW` words are read in place; only the last partial row
    is copied (zero-padded)."""
    raw = t.detach().contiguous().view(torch.uint8).reshape(-1)
    row_bytes = 4 * _SUM_ROW
    body = raw.numel() - raw.numel() % row_bytes
    s1 = s2 = 0
    if body:
        s1, s2 = _row_sums(raw[:body].view(torch.int32).view(-1, _SUM_ROW), 1)
    if body < raw.numel():
        tail = torch.cat([raw[body:], raw.new_zeros(row_bytes - (raw.numel() - body))])
        t1, t2 = _row_sums(tail.view(torch.int32).view(1, _SUM_ROW), body // 4 + 1)
        s1, s2 = s1 + t1, s2 + t2
    mask = 0xFFFFFFFF
    return (s1 & mask) | ((s2 & mask) << 32)


def _row_sums(words32: torch.Tensor, first_position: int) -> tuple[int, int]:
    """(sum w, sum p * w), each mod 2^32, of rows of int32 words whose first word has position
    `first_position` (positions count on through the rows)."""
    mask = 0xFFFFFFFF
    words = words32.to(torch.int64) & mask  # w < 2^32
    position = (torch.arange(first_position, first_position + words.numel(), device=words.device,
                             dtype=torch.int64).view_as(words) & mask)
    # w * p mod 2^32 = w * p_lo + 2^16 * (w * p_hi mod 2^16), p = p_lo + 2^16 p_hi: terms below 2^49
    terms = words * (position & 0xFFFF) + (((words * (position >> 16)) & 0xFFFF) << 16)
    return (int((words.sum(dim=1) & mask).sum()) & mask,
            int((terms.sum(dim=1) & mask).sum()) & mask)


@dataclass(frozen=True)
class FramePlan:
    """One frame: `layers` layers from `layer` of K or V, blocks [start, start + n)."""

    kind: int
    layer: int
    start: int
    n: int
    layers: int = 1

    def __iter__(self):  # (kind, layer, start, n), as callers unpack it
        return iter((self.kind, self.layer, self.start, self.n))


def plan_frames(spec: KVSpec, num_blocks: int, max_frame_bytes: int = MAX_FRAME_BYTES,
                layers: tuple[int, int] | None = None) -> list[FramePlan]:
    """The frames of a transfer (or of one lane's layers `[lo, hi)`), K of every layer first, then
    V, each at most `max_frame_bytes` of payload (one block per frame if a block alone is larger).
    When a whole layer fits, one frame carries as many whole layers as fit; else layers are split
    along blocks."""
    lo, hi = layers or (0, spec.num_layers)
    layer_bytes = num_blocks * spec.block_bytes
    if layer_bytes <= max_frame_bytes:
        per = max(1, max_frame_bytes // layer_bytes)
        return [FramePlan(kind, first, 0, num_blocks, min(per, hi - first))
                for kind in (K, V) for first in range(lo, hi, per)]
    per_frame = max(1, max_frame_bytes // spec.block_bytes)
    return [FramePlan(kind, layer, start, min(per_frame, num_blocks - start))
            for kind in (K, V) for layer in range(lo, hi)
            for start in range(0, num_blocks, per_frame)]


def plan_frames_streamed(spec: KVSpec, num_blocks: int, max_frame_bytes: int = MAX_FRAME_BYTES,
                         layers: tuple[int, int] | None = None) -> list[FramePlan]:
    """The frames of a transfer whose KV arrives in block order (prompt chunks as they are
    prefilled): block range by block range (each at most `max_frame_bytes` per layer), K then V of
    every layer (of `layers`, a lane's `[lo, hi)`) within a range, one layer per frame, so a range
    can leave once its blocks exist."""
    lo, hi = layers or (0, spec.num_layers)
    per_frame = max(1, max_frame_bytes // spec.block_bytes)
    return [FramePlan(kind, layer, start, min(per_frame, num_blocks - start))
            for start in range(0, num_blocks, per_frame) for kind in (K, V) for layer in range(lo, hi)]


def lane_layers(num_layers: int, lanes: int) -> list[tuple[int, int]]:
    """The layers `[lo, hi)` each of `lanes` parallel PushKV streams carries: contiguous, as even as
    can be, every lane at least one layer (so at most `num_layers` lanes)."""
    if not 1 <= lanes <= num_layers:
        raise ValueError(f"{lanes} lanes for {num_layers} layers")
    bounds = [num_layers * i // lanes for i in range(lanes + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def make_header(spec: KVSpec, kind: int, layer: int, start: int, n: int, crc: int,
                layers: int = 1) -> node_pb2.TensorHeader:
    return node_pb2.TensorHeader(kind=kind, layer=layer, block_start=start, dtype=dtype_name(spec.dtype),
                                 shape=[n, *spec.block_shape], crc32=crc, num_layers=layers if layers > 1 else 0)


class KVSender(abc.ABC):
    """Prefill side of one transport: moves one request's KV to a decode node's reservation."""

    transport: int

    @abc.abstractmethod
    async def send(self, target: node_pb2.KVTarget, k: torch.Tensor, v: torch.Tensor, timeout: float) -> int:
        """Sends K and V (`[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`) and
        returns the payload bytes moved. Raises `engine.rpc.errors.Unavailable` when the decode
        node cannot be reached or refuses the transfer."""

    async def send_parts(self, target: node_pb2.KVTarget, parts, num_blocks: int, timeout: float) -> int:
        """Like `send`, for KV that arrives in parts (`(first_block, k, v)` block ranges in order,
        covering `num_blocks`). Transports that cannot stream early parts take them all first."""
        ks, vs, blocks = [], [], 0
        async for start, k, v in parts:
            if start != blocks:
                raise ValueError(f"KV part at block {start} does not follow block {blocks}")
            ks.append(k)
            vs.append(v)
            blocks = start + k.shape[1]
        if blocks != num_blocks:
            raise ValueError(f"the KV parts ended at block {blocks} of {num_blocks}")
        k, v = (ks[0], vs[0]) if len(ks) == 1 else (torch.cat(ks, dim=1), torch.cat(vs, dim=1))
        return await self.send(target, k, v, timeout)

    async def close(self) -> None:
        pass


@dataclass
class KVLanding:
    """What a receiver needs of one decode reservation."""

    reservation_id: str
    spec: KVSpec
    num_blocks: int
    progress: Callable[[], None]  # a frame (or commit) arrived: renews the lease
    write: Callable[[torch.Tensor, torch.Tensor], Awaitable[None]]  # into the reserved blocks, off the loop
    # Optional, called on worker threads: part of the transfer into its blocks as it lands
    # (kind K/V, first layer, first reserved block, blocks, data [layers, n, ...]); then `write` is not used.
    write_part: Callable[[int, int, int, int, torch.Tensor], None] | None = None


@dataclass(frozen=True)
class Received:
    bytes: int
    frames: int


class KVReceiver(abc.ABC):
    """Decode side of one transport: lands one transfer in a reservation's blocks, validating
    everything before it is written; never returns unless every block of every layer arrived."""

    transport: int

    @abc.abstractmethod
    async def receive(self, landing: KVLanding, request, context) -> Received:
        """`request`: the PushKV frames (an async iterator) or a KVCommit, per transport. Raises
        `TransferError` (INVALID_ARGUMENT) for anything forged or incomplete."""

    def close(self) -> None:
        pass
