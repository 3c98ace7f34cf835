"""The transfer interface, the KV layout both sides must agree on, and frame planning."""
from __future__ import annotations

import abc
import zlib
from dataclasses import dataclass

import torch

from engine.rpc import convert
from protos.pdserve.v1 import node_pb2

MAX_FRAME_BYTES = 2**20  # payload per PushKV frame
K, V = 0, 1


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
        s = engine.shape
        return cls(s.num_layers, engine.cache_config.block_size, s.num_kv_heads, s.head_dim, engine.dtype)

    @classmethod
    def from_proto(cls, msg: node_pb2.KVLayout) -> "KVSpec":
        return cls(msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, convert.dtype_from_name(msg.dtype))

    def to_proto(self) -> node_pb2.KVLayout:
        return node_pb2.KVLayout(num_layers=self.num_layers, block_size=self.block_size,
                                 num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                 dtype=convert.dtype_name(self.dtype))

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
    if isinstance(t_or_bytes, torch.Tensor):
        t_or_bytes = memoryview(t_or_bytes.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy())
    return zlib.crc32(t_or_bytes) & 0xFFFFFFFF


def plan_frames(spec: KVSpec, num_blocks: int, max_frame_bytes: int = MAX_FRAME_BYTES) -> list[tuple[int, int, int, int]]:
    """(kind, layer, block_start, n_blocks) per frame: split along blocks, per layer, per K/V, each
    at most `max_frame_bytes` of payload (one block per frame if a block alone is larger)."""
    per_frame = max(1, max_frame_bytes // spec.block_bytes)
    return [(kind, layer, start, min(per_frame, num_blocks - start))
            for layer in range(spec.num_layers) for kind in (K, V)
            for start in range(0, num_blocks, per_frame)]


def make_header(spec: KVSpec, kind: int, layer: int, start: int, n: int, crc: int) -> node_pb2.TensorHeader:
    return node_pb2.TensorHeader(kind=kind, layer=layer, block_start=start, dtype=convert.dtype_name(spec.dtype),
                                 shape=[n, *spec.block_shape], crc32=crc)


class KVSender(abc.ABC):
    """Prefill side: moves one request's KV to a decode node's reservation."""

    @abc.abstractmethod
    async def send(self, target: node_pb2.KVTarget, k: torch.Tensor, v: torch.Tensor, timeout: float) -> int:
        """Sends K and V (`[num_layers, num_blocks, block_size, num_kv_heads, head_dim]`) and
        returns the payload bytes moved. Raises `engine.rpc.errors.Unavailable` when the decode
        node cannot be reached or refuses the transfer."""

    async def close(self) -> None:
        pass
