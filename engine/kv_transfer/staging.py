"""Decode side: assembles one reservation's KV frames into a staging buffer.

Every header is checked before anything is allocated or copied:
    reservation id  == this reservation          seq          == the next expected frame
    total_frames    == the first frame's, and within what the reservation can hold
    kind in {K, V}, layer + num_layers <= the cache's layers       dtype == the receiver's cache dtype
    shape           == [n, block_size, kv_heads, head_dim], 1 <= n, product bounded by the reservation
    block_start + n <= reserved blocks, and those blocks not already filled (no replays); a frame of
                       several layers covers every block of them (block_start 0, n == reserved)
    payload length  == layers * product * element size              CRC32 == header.crc32
                                                   (torch.distributed: sum64 == header.sum64)
A transfer is complete only when the last frame arrived and every block of every layer of K and V
is filled exactly once. Anything else leaves `complete` False: decode never runs on partial KV.

Two ways in: `add_frame` (header, CRC, then the copy, all at once) and, for a receiver that
overlaps checking and copying with receiving, `accept` (header only, on the event loop) followed by
`fill` (CRC and copy, on a worker thread); `complete` waits for every fill.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from engine.kv_transfer.base import K, V, KVSpec, crc32, dtype_name, sum64
from protos.pdserve.v1 import node_pb2


class TransferError(ValueError):
    """A frame that must be rejected (INVALID_ARGUMENT)."""


class Slot(NamedTuple):
    """Where a validated frame lands."""

    kind: int
    layer: int
    start: int
    n: int
    nbytes: int
    layers: int = 1


class KVStaging:
    """One reservation's transfer, or one lane of it: `layers` = the lane's `[lo, hi)` (the other
    layers count as filled, so every check below holds per lane); `buffers` gives the (k, v)
    staging the lanes of one transfer share (each fills its own layers), once a first frame is valid."""

    def __init__(self, reservation_id: str, spec: KVSpec, num_blocks: int, device: torch.device | str = "cpu",
                 pin_memory: bool = False, layers: tuple[int, int] | None = None,
                 buffers: "Callable[[], tuple[torch.Tensor, torch.Tensor]] | None" = None):
        self.reservation_id = reservation_id
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.pin_memory = pin_memory and self.device.type == "cpu"
        self.layers = layers or (0, spec.num_layers)
        self._buffers = buffers
        self.k: torch.Tensor | None = None  # allocated after the first frame is validated
        self.v: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Drops whatever arrived; a new transfer starts again from seq 0."""
        self.next_seq = 0
        self.total_frames: int | None = None
        lo, hi = self.layers
        self.filled = np.ones((2, self.spec.num_layers, self.num_blocks), dtype=bool)
        self.filled[:, lo:hi] = False
        self.bytes_received = 0
        self.frames = 0
        self.k = self.v = None

    @property
    def max_frames(self) -> int:
        return 2 * (self.layers[1] - self.layers[0]) * self.num_blocks

    @property
    def complete(self) -> bool:
        return (self.total_frames is not None and self.next_seq == self.total_frames
                and self.frames == self.total_frames and bool(self.filled.all()))

    @property
    def started(self) -> bool:
        return self.next_seq > 0

    # ---- validation -----------------------------------------------------------------------------
    def check(self, frame: node_pb2.KVFrame, with_payload: bool = True) -> Slot:
        """Validates a frame's header (not its payload CRC); returns where it lands."""
        spec = self.spec
        if frame.reservation_id != self.reservation_id:
            raise TransferError("frame belongs to another reservation")
        if self.total_frames is not None and self.next_seq == self.total_frames:
            raise TransferError("the reservation's KV is already complete (replayed frame)")
        if frame.seq != self.next_seq:
            raise TransferError(f"frame seq {frame.seq} out of order (expected {self.next_seq}): stale or replayed")
        if not 1 <= frame.total_frames <= self.max_frames:
            raise TransferError(f"total_frames {frame.total_frames} outside [1, {self.max_frames}] for "
                                f"{self.num_blocks} reserved blocks")
        if self.total_frames is not None and frame.total_frames != self.total_frames:
            raise TransferError(f"total_frames changed from {self.total_frames} to {frame.total_frames}")
        h = frame.header
        if h.kind not in (K, V):
            raise TransferError(f"header kind must be 0 (K) or 1 (V), got {h.kind}")
        layers = h.num_layers or 1
        if h.layer >= spec.num_layers or layers > spec.num_layers - h.layer:
            raise TransferError(f"layers [{h.layer}, {h.layer + layers}) out of range (the cache has "
                                f"{spec.num_layers} layers)")
        lo, hi = self.layers
        if h.layer < lo or h.layer + layers > hi:
            raise TransferError(f"layers [{h.layer}, {h.layer + layers}) are not this lane's [{lo}, {hi})")
        expected_dtype = dtype_name(spec.dtype)
        if h.dtype != expected_dtype:
            raise TransferError(f"dtype {h.dtype[:32]!r} differs from the receiver's {expected_dtype!r}")
        shape = list(h.shape)
        if len(shape) != 4 or tuple(shape[1:]) != spec.block_shape or shape[0] < 1:
            raise TransferError(f"shape {shape[:8]} does not match [n >= 1, {', '.join(map(str, spec.block_shape))}]")
        n = shape[0]
        elems = n * spec.block_size * spec.num_kv_heads * spec.head_dim  # python ints: no overflow
        if elems > self.num_blocks * spec.block_size * spec.num_kv_heads * spec.head_dim:
            raise TransferError("shape larger than the reservation")
        if h.block_start + n > self.num_blocks:
            raise TransferError(f"blocks [{h.block_start}, {h.block_start + n}) outside the {self.num_blocks} "
                                f"reserved blocks")
        if layers > 1 and (h.block_start != 0 or n != self.num_blocks):
            raise TransferError("a frame of several layers must carry every reserved block of them")
        if self.filled[h.kind, h.layer:h.layer + layers, h.block_start:h.block_start + n].any():
            raise TransferError("frame overwrites blocks already received (replayed)")
        nbytes = layers * elems * spec.elem_size
        if with_payload and len(frame.data) != nbytes:
            raise TransferError(f"payload has {len(frame.data)} bytes; the header declares {nbytes}")
        if not with_payload and frame.data:
            raise TransferError("a header-only frame must carry no payload")
        if frame.seq == frame.total_frames - 1:
            covered = int(self.filled.sum()) + layers * n
            if covered != self.filled.size:
                raise TransferError(f"last frame leaves {self.filled.size - covered} blocks missing "
                                    f"(wrong total_frames)")
        return Slot(h.kind, h.layer, h.block_start, n, nbytes, layers)

    # ---- filling ----------------------------------------------------------------------------------
    def _allocate(self) -> None:
        if self.k is None and self._buffers is not None:
            self.k, self.v = self._buffers()
        elif self.k is None:
            shape = (self.spec.num_layers, self.num_blocks, *self.spec.block_shape)
            kw = dict(dtype=self.spec.dtype, device=self.device, pin_memory=self.pin_memory)
            self.k = torch.empty(shape, **kw)
            self.v = torch.empty(shape, **kw)

    def _accept_header(self, frame: node_pb2.KVFrame, slot: Slot) -> None:
        self.filled[slot.kind, slot.layer:slot.layer + slot.layers, slot.start:slot.start + slot.n] = True
        self.total_frames = frame.total_frames
        self.next_seq += 1

    def landed(self, slot: Slot) -> None:
        """Counts a frame whose `fill` returned (call on the thread that owns the staging)."""
        self.frames += 1
        self.bytes_received += slot.nbytes

    def slot_tensor(self, slot: Slot) -> torch.Tensor:
        """The staging region of a frame: `[layers, n, block_size, kv_heads, head_dim]`."""
        return self._slot(slot)

    def _slot(self, slot: Slot) -> torch.Tensor:
        return (self.k if slot.kind == K else self.v)[slot.layer:slot.layer + slot.layers, slot.start:slot.start + slot.n]

    def _copy_in(self, data: bytes, slot: Slot) -> None:
        dst = self._slot(slot).view(torch.uint8).reshape(-1)
        if dst.device.type == "cpu":
            dst.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def add_frame(self, frame: node_pb2.KVFrame) -> None:
        """gRPC transport: header + payload in one frame; checked, CRC-checked, then copied."""
        slot = self.check(frame, with_payload=True)
        if crc32(frame.data) != frame.header.crc32:
            raise TransferError(f"CRC32 mismatch in frame {frame.seq}")
        self._allocate()
        self._copy_in(frame.data, slot)
        self._accept_header(frame, slot)
        self.landed(slot)

    def accept(self, frame: node_pb2.KVFrame) -> Slot:
        """Event loop: validates the header (and payload length) and books its blocks; `fill`
        (a worker thread) then checks the CRC and copies. Allocates the staging buffers (bounded by
        the reservation) once the first header is valid."""
        slot = self.check(frame, with_payload=True)
        self._allocate()
        self._accept_header(frame, slot)
        return slot

    def fill(self, frame: node_pb2.KVFrame, slot: Slot) -> Slot:
        """Worker thread: the CRC of an accepted frame, then its copy into the staging buffer (frames
        fill disjoint blocks, so several may run at once); then `landed(slot)`."""
        if crc32(frame.data) != frame.header.crc32:
            raise TransferError(f"CRC32 mismatch in frame {frame.seq}")
        self._copy_in(frame.data, slot)
        return slot

    def receive_buffer(self, frame: node_pb2.KVFrame) -> tuple[torch.Tensor, tuple]:
        """torch.distributed transport: validates a header-only frame and returns a uint8 buffer of the
        declared size to receive the payload into, plus a token for `add_received`."""
        slot = self.check(frame, with_payload=False)
        self._allocate()
        buf = torch.empty(slot.nbytes, dtype=torch.uint8, device=self.device)
        return buf, (frame, slot)

    def add_received(self, buf: torch.Tensor, token: tuple) -> None:
        """The payload received for a header-only frame: its checksum (`sum64` on the buffer's own
        device; a sender of CRC32 is checked on the host), then into the staging."""
        frame, slot = token
        if frame.header.HasField("sum64"):
            if sum64(buf) != frame.header.sum64:
                raise TransferError(f"checksum (sum64) mismatch in frame {frame.seq}")
        elif crc32(buf) != frame.header.crc32:
            raise TransferError(f"CRC32 mismatch in frame {frame.seq}")
        self._slot(slot).view(torch.uint8).reshape(-1).copy_(buf)
        self._accept_header(frame, slot)
        self.landed(slot)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.complete:
            raise TransferError("the KV transfer is incomplete")
        return self.k, self.v
