"""KV over gRPC: a `DecodeNode.PushKV` client stream of frames of at most `MAX_FRAME_BYTES` payload.

    prefill (GrpcKVSender)                                decode (GrpcKVReceiver)
    export (device gather) -> one D2H copy per tensor      accept(header) on the loop: validated,
      into pinned memory, on a worker thread                 lease renewed
    frames i+1..i+4 built (CRC32, serialized) on     ──►   fill (CRC32, copy into pinned staging)
      worker threads while frame i is written                on worker threads, up to 4 at once,
                                                             overlapping the next frames
                                                           every frame in: one copy of K and V into
                                                             the reserved blocks (write_blocks)

Nothing on either event loop touches payload bytes: frames are serialized off the loop (the stub
sends ready bytes) and the decode side's CRC and copies run on worker threads. Every write has a
budget that follows its bytes; a stalled peer ends the transfer with one clear `Unavailable`.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import threading

import grpc
import torch

from engine.kv_transfer.base import (K, MAX_FRAME_BYTES, MAX_KV_LANES, T, V, KVLanding, KVReceiver, KVSender,
                                     KVSpec, Received, crc32, lane_layers, make_header, plan_frames,
                                     plan_frames_streamed)
from engine.kv_transfer.staging import KVStaging, TransferError
from engine.rpc.channel import NODE_KEEPALIVE, aio_channel, sync_channel
from engine.rpc.security import ClientSecurity
from engine.rpc.errors import Unavailable
from protos.pdserve.v1 import node_pb2, node_pb2_grpc

PUSH_KV = "/pdserve.v1.DecodeNode/PushKV"
PIPELINE_DEPTH = 4  # frames built (sender) or checked and copied (receiver) at once on worker threads
FRAME_BASE_BUDGET_S = 10.0  # a frame write may wait this long for flow control...
MIN_BYTES_PER_S = 4 * 2**20  # ...plus its bytes at this (very pessimistic) rate
_DATA_TAG = bytes([(5 << 3) | 2])  # KVFrame.data: field 5, length-delimited


def frame_budget(nbytes: int) -> float:
    """Seconds one frame of `nbytes` may take before the peer counts as stalled."""
    return FRAME_BASE_BUDGET_S + nbytes / MIN_BYTES_PER_S


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class HostKV:
    """A transfer's K and V in host memory, possibly arriving in parts (block ranges, in order).
    On CUDA each part is one asynchronous copy of K and one of V into pinned buffers of the whole
    transfer on a side stream, waited for on the calling worker thread, so the frames of earlier
    parts are on the wire while later parts are still being computed. On CPU a single part is used
    as it is."""

    @torch.inference_mode()
    def __init__(self, shape: tuple, dtype: torch.dtype, device: torch.device):
        self.cuda = device.type == "cuda"
        self.k = torch.empty(shape, dtype=dtype, pin_memory=self.cuda)
        self.v = torch.empty(shape, dtype=dtype, pin_memory=self.cuda)
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._events: dict | None = None  # (kind, layer) -> CUDA event, for `copying`

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> "HostKV":
        """The whole transfer as one part, in host memory when this returns."""
        host = cls.copying(k, v)
        host.wait(K, 0, k.shape[0])
        host.wait(V, 0, v.shape[0])
        return host

    @classmethod
    @torch.inference_mode()
    def copying(cls, k: torch.Tensor, v: torch.Tensor) -> "HostKV":
        """The whole transfer, its D2H copies queued layer by layer (K of every layer, then V, the
        order of `plan_frames`) on a side stream; `wait(kind, layer, n)` returns once those layers
        are in host memory, so the first frames leave while later layers are still being copied."""
        if k.device.type != "cuda":
            host = cls.__new__(cls)
            host.cuda, host._stream, host._events = False, None, None
            host.k, host.v = k.contiguous(), v.contiguous()
            return host
        host = cls(tuple(k.shape), k.dtype, k.device)
        stream = host._stream
        stream.wait_stream(torch.cuda.current_stream(k.device))
        host._events = {}
        with torch.cuda.stream(stream):
            for kind, src, dst in ((K, k, host.k), (V, v, host.v)):
                for layer in range(src.shape[0]):
                    dst[layer].copy_(src[layer], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(stream)
                    host._events[kind, layer] = event
        for t in (k, v):
            t.record_stream(stream)  # the caller may drop them before the copies ran
        return host

    def wait(self, kind: int, layer: int, n: int = 1) -> None:
        """Until layers [layer, layer + n) of `kind` are in host memory (parts added by `add` are
        there already)."""
        if self._events:
            self._events[kind, layer + n - 1].synchronize()  # copies run in order on one stream

    @torch.inference_mode()
    def add(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Blocks [start, start + n) of every layer (`k`, `v`: `[layers, n, ...]`); returns once
        they are in host memory."""
        end = start + k.shape[1]
        if not self.cuda:
            self.k[:, start:end].copy_(k)
            self.v[:, start:end].copy_(v)
            return
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(stream):
            self.k[:, start:end].copy_(k, non_blocking=True)
            self.v[:, start:end].copy_(v, non_blocking=True)
        stream.synchronize()


def encode_frame(reservation_id: str, spec: KVSpec, host: HostKV, plan: list, seq: int, lane: int = 0,
                 lanes: int = 1) -> bytes:
    """The serialized PushKV frame `seq` of `plan` (its blocks in host memory; `plan` is lane
    `lane`'s of `lanes`): header fields, then the payload appended as field 5 (one copy of the
    payload; protobuf accepts fields in any order)."""
    p = plan[seq]
    host.wait(p.kind, p.layer, p.layers)
    src = (host.k if p.kind == K else host.v)[p.layer:p.layer + p.layers, p.start:p.start + p.n]
    payload = memoryview(src.contiguous().view(torch.uint8).reshape(-1).numpy())
    header = make_header(spec, p.kind, p.layer, p.start, p.n, crc32(payload), p.layers)
    head = node_pb2.KVFrame(reservation_id=reservation_id, seq=seq, total_frames=len(plan), header=header,
                            lane=lane, lanes=lanes if lanes > 1 else 0).SerializeToString()
    return b"".join((head, _DATA_TAG, _varint(len(payload)), payload))


class WireFrame:
    """A received PushKV frame: KVFrame's fields, its payload a view into the received message bytes.
    Parsing the message with protobuf would copy the payload (several MiB per frame) on the event
    loop, and every read of `KVFrame.data` copies it again; this reads it in place."""

    __slots__ = ("reservation_id", "seq", "total_frames", "header", "data", "lane", "lanes")

    def __init__(self, fields: node_pb2.KVFrame, data: memoryview):
        self.reservation_id, self.seq, self.total_frames = fields.reservation_id, fields.seq, fields.total_frames
        self.header, self.data = fields.header, data
        self.lane, self.lanes = fields.lane, fields.lanes


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise TransferError("malformed KVFrame: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def decode_frame(raw) -> "WireFrame | node_pb2.KVFrame":
    """A PushKV request as received (serialized bytes) -> its fields and a zero-copy view of its
    payload. Walks the message's top-level fields (protobuf wire format); every field but the
    payload (field 5) goes through the generated parser, so unknown fields, repeated scalars and
    any field order are handled as protobuf would; a malformed message is a TransferError. An
    already-parsed KVFrame (in-process callers) is returned as it is."""
    if isinstance(raw, node_pb2.KVFrame):
        return raw
    buf = memoryview(raw)
    pos, end = 0, len(buf)
    others: list[memoryview] = []
    data = buf[0:0]
    while pos < end:
        start = pos
        tag, pos = _read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise TransferError("malformed KVFrame: field number 0")
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise TransferError("malformed KVFrame: a field runs past the end of the message")
            if field == 5:  # the payload (the last occurrence wins, as in protobuf)
                data = buf[pos:pos + length]
                pos += length
                continue
            pos += length
        else:
            raise TransferError(f"malformed KVFrame: wire type {wire_type} is not used by KVFrame")
        if pos > end:
            raise TransferError("malformed KVFrame: a field runs past the end of the message")
        others.append(buf[start:pos])
    try:
        fields = node_pb2.KVFrame.FromString(b"".join(others))
    except Exception as exc:  # protobuf's DecodeError
        raise TransferError(f"malformed KVFrame: {exc}") from None
    return WireFrame(fields, data)  # a field 5 of another wire type is an unknown field there: no payload


async def decoded_frames(requests):
    """PushKV's request stream (raw bytes, see `decode_frame`) as frames."""
    async for raw in requests:
        yield decode_frame(raw)


def grpc_frames(reservation_id: str, spec: KVSpec, k: torch.Tensor, v: torch.Tensor,
                max_frame_bytes: int | None = None):
    """The PushKV frames of one transfer as messages, in order (a generator; tests and tools)."""
    num_blocks = spec.check_tensors(k, v)
    host = HostKV.of(k, v)
    plan = plan_frames(spec, num_blocks, *(() if max_frame_bytes is None else (max_frame_bytes,)))
    for seq in range(len(plan)):
        yield node_pb2.KVFrame.FromString(encode_frame(reservation_id, spec, host, plan, seq))


class Channels:
    """One aio channel per decode address, kept open; and, for worker threads, one blocking channel
    per address (the NCCL transport's rendezvous store calls)."""

    def __init__(self, security: ClientSecurity | None = None):
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sync: dict[str, grpc.Channel] = {}
        self._sync_lock = threading.Lock()
        self.security = security  # the node key and TLS this node calls its peers with

    def channel(self, address: str, lane: int = 0) -> grpc.aio.Channel:
        """The channel to `address`; lane i > 0 of a KV transfer gets one of its own, on its own
        connection (a local subchannel pool: channels otherwise share one connection per address)."""
        key = address if lane == 0 else f"{address}#lane{lane}"
        if key not in self._channels:
            options = NODE_KEEPALIVE if lane == 0 else (*NODE_KEEPALIVE, ("grpc.use_local_subchannel_pool", 1))
            self._channels[key] = aio_channel(address, options=options, security=self.security)
        return self._channels[key]

    def stub(self, address: str) -> node_pb2_grpc.DecodeNodeStub:
        return node_pb2_grpc.DecodeNodeStub(self.channel(address))

    def sync_channel(self, address: str) -> grpc.Channel:
        """A blocking channel to `address` with this node's TLS (any thread); calls add `metadata()`."""
        with self._sync_lock:
            if address not in self._sync:
                self._sync[address] = sync_channel(address, options=NODE_KEEPALIVE, security=self.security)
            return self._sync[address]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The node key as call metadata (the aio channels add it themselves)."""
        return self.security.metadata() if self.security is not None else ()

    def push_kv_raw(self, address: str, lane: int = 0):
        """PushKV taking frames already serialized (bytes), so no payload is encoded on the loop."""
        return self.channel(address, lane).stream_unary(PUSH_KV, request_serializer=None,
                                                  response_deserializer=node_pb2.PushKVResponse.FromString)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()
        with self._sync_lock:
            sync, self._sync = self._sync, {}
        for ch in sync.values():
            ch.close()


async def call_failure(call, exc: BaseException) -> str:
    """A one-line reason for a failed client-streaming call (the status once the RPC ended)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        call.cancel()
        return "the decode node stopped taking frames (no progress within the frame budget)"
    try:  # InvalidStateError: the decode node ended the RPC while we were writing
        await call
    except grpc.aio.AioRpcError as rpc_exc:
        return f"{rpc_exc.code().name}: {rpc_exc.details()}"
    except asyncio.CancelledError:
        return "CANCELLED"
    return "the decode node ended the transfer early"


class _Arrived:
    """The blocks of a streamed transfer that reached host memory so far (event loop side)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.blocks = 0
        self.host: HostKV | None = None
        self._progress = asyncio.Event()

    @classmethod
    def whole(cls, host: HostKV, num_blocks: int) -> "_Arrived":
        arrived = cls(num_blocks)
        arrived.host, arrived.blocks = host, num_blocks
        return arrived

    async def take(self, spec: KVSpec, parts) -> None:
        """Consumes `parts` into host memory (the copies run on a worker thread)."""
        loop = asyncio.get_running_loop()
        async for start, k, v in parts:
            n = spec.check_tensors(k, v)
            if start != self.blocks or start + n > self.num_blocks:
                raise ValueError(f"KV part [{start}, {start + n}) does not follow block {self.blocks} "
                                 f"of {self.num_blocks}")
            if self.host is None:
                self.host = HostKV((spec.num_layers, self.num_blocks, *spec.block_shape), k.dtype, k.device)
            await loop.run_in_executor(None, self.host.add, start, k, v)
            self.blocks = start + n
            self._progress.set()
        if self.blocks != self.num_blocks:
            raise ValueError(f"the KV parts ended at block {self.blocks} of {self.num_blocks}")

    async def wait_for(self, end: int, producer: asyncio.Task | None) -> None:
        """Until `end` blocks arrived; raises the producer's failure if it ends first."""
        while self.blocks < end:
            if producer is None or producer.done():
                if producer is not None:
                    producer.result()
                raise ValueError(f"the KV parts ended at block {self.blocks} of {self.num_blocks}")
            self._progress.clear()
            waiter = asyncio.ensure_future(self._progress.wait())
            await asyncio.wait([waiter, producer], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()


class GrpcKVSender(KVSender):
    """Frames over `lanes` concurrent PushKV calls (one connection each; fewer if the decode node
    takes fewer, `KVTarget.kv_lanes`), lane i carrying a contiguous range of layers."""

    transport = T.KV_TRANSPORT_GRPC

    def __init__(self, channels: Channels | None = None, max_frame_bytes: int = MAX_FRAME_BYTES, lanes: int = 1):
        if not 1 <= lanes <= MAX_KV_LANES:
            raise ValueError(f"KV lanes must be 1 to {MAX_KV_LANES}, got {lanes}")
        self.channels = channels or Channels()
        self.max_frame_bytes = max_frame_bytes
        self.lanes = lanes

    def lanes_for(self, target: node_pb2.KVTarget, spec: KVSpec) -> int:
        return max(1, min(self.lanes, target.kv_lanes or 1, spec.num_layers))

    async def send(self, target: node_pb2.KVTarget, k: torch.Tensor, v: torch.Tensor, timeout: float) -> int:
        spec = KVSpec.from_proto(target.layout)
        num_blocks = spec.check_tensors(k, v)
        loop = asyncio.get_running_loop()
        host = await loop.run_in_executor(None, HostKV.copying, k, v)  # D2H copies queued; frames wait per layer
        lanes = self.lanes_for(target, spec)
        plans = [plan_frames(spec, num_blocks, self.max_frame_bytes, layers)
                 for layers in lane_layers(spec.num_layers, lanes)]
        return await self._lanes(target, spec, plans, _Arrived.whole(host, num_blocks), timeout)

    async def send_parts(self, target: node_pb2.KVTarget, parts, num_blocks: int, timeout: float) -> int:
        """Streams a transfer whose KV arrives in parts: `parts` yields `(first_block, k, v)` block
        ranges in order (the KV of prompt chunks as they are prefilled, then the rest), covering
        `num_blocks`. Frames go block range by block range (one layer each), each as soon as its
        blocks are in host memory, while later parts are still being computed."""
        spec = KVSpec.from_proto(target.layout)
        arrived = _Arrived(num_blocks)
        producer = asyncio.get_running_loop().create_task(arrived.take(spec, parts))
        lanes = self.lanes_for(target, spec)
        plans = [plan_frames_streamed(spec, num_blocks, self.max_frame_bytes, layers)
                 for layers in lane_layers(spec.num_layers, lanes)]
        try:
            return await self._lanes(target, spec, plans, arrived, timeout, producer)
        finally:
            if not producer.done():
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

    async def _lanes(self, target, spec: KVSpec, plans: list, arrived: "_Arrived", timeout: float,
                     producer: asyncio.Task | None = None) -> int:
        """Every lane's stream at once; the first failure cancels the others and is raised."""
        if len(plans) == 1:
            return await self._stream(target, spec, plans[0], arrived, timeout, producer)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._stream(target, spec, plan, arrived, timeout, producer, lane, len(plans)))
                 for lane, plan in enumerate(plans)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            if failed:
                raise failed[0].exception()
            return sum(t.result() for t in tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, target, spec: KVSpec, plan: list, arrived: "_Arrived", timeout: float,
                      producer: asyncio.Task | None = None, lane: int = 0, lanes: int = 1) -> int:
        loop = asyncio.get_running_loop()
        call = self.channels.push_kv_raw(target.decode_address, lane)(timeout=timeout)
        ahead: collections.deque = collections.deque()
        try:
            next_build = 0
            for _ in range(len(plan)):
                while next_build < len(plan) and len(ahead) < PIPELINE_DEPTH:  # built while frames are written
                    end = plan[next_build].start + plan[next_build].n
                    if end > arrived.blocks:
                        if ahead:
                            break  # write what is built; the rest is still being computed
                        await arrived.wait_for(end, producer)
                        continue
                    ahead.append(loop.run_in_executor(None, encode_frame, target.reservation_id, spec, arrived.host,
                                                      plan, next_build, lane, lanes))
                    next_build += 1
                data = await ahead.popleft()
                await asyncio.wait_for(call.write(data), frame_budget(len(data)))
            if producer is not None:
                await producer  # its own failure, if any
            await call.done_writing()
            reply = await call
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError) as exc:
            where = f" (lane {lane} of {lanes})" if lanes > 1 else ""
            reason = await call_failure(call, exc)
            raise Unavailable(f"KV transfer to the decode node failed{where}: {reason}") from None
        except BaseException:
            call.cancel()
            raise
        finally:
            for fut in ahead:
                fut.cancel()
        return reply.bytes_received

    async def close(self) -> None:
        await self.channels.close()


class GrpcKVReceiver(KVReceiver):
    """Frames land in host staging (pinned when the cache is on CUDA). When the landing can write
    part of a transfer (`write_part`), each frame goes on into its reserved blocks right after its
    CRC check, on the same worker thread, overlapping the frames still arriving; otherwise one copy
    of K and V goes into the reserved blocks after the last frame."""

    transport = T.KV_TRANSPORT_GRPC

    def __init__(self, cache_device: torch.device):
        self.pin_memory = cache_device.type == "cuda"

    async def receive(self, landing: KVLanding, frames, context) -> Received:
        staging = KVStaging(landing.reservation_id, landing.spec, landing.num_blocks, "cpu", self.pin_memory)
        got = await self._land(staging, landing, frames, 0, 1)
        if landing.write_part is None:
            await landing.write(staging.k, staging.v)
        return got

    async def receive_lane(self, lanes: "LaneSet", lane: int, frames) -> tuple[Received, bool]:
        """One lane (a PushKV call) of a transfer over several: its layers into the shared staging
        (and on into the blocks). Returns what it received and whether it completed the transfer
        (then the whole staging went into the blocks, where the landing takes whole transfers)."""
        staging = lanes.join(lane)
        try:
            got = await self._land(staging, lanes.landing, frames, lane, lanes.lanes, lanes)
        except BaseException as exc:
            lanes.fail(lane, exc)
            raise
        finally:
            lanes.active -= 1
        lanes.bytes += got.bytes
        return got, await lanes.finish_lane()

    async def _land(self, staging: KVStaging, landing: KVLanding, frames, lane: int, lanes: int,
                    lane_set: "LaneSet | None" = None) -> Received:
        loop = asyncio.get_running_loop()
        fills: collections.deque = collections.deque()
        fill = staging.fill if landing.write_part is None else functools.partial(_fill_and_write, staging,
                                                                                 landing.write_part)

        async def land_oldest():
            slot = await fills[0][1]
            fills.popleft()
            staging.landed(slot)
        try:
            async for frame in frames:
                if frame.lane != lane or max(frame.lanes, 1) != lanes:
                    raise TransferError(f"a frame of lane {frame.lane} of {max(frame.lanes, 1)} in the stream of "
                                        f"lane {lane} of {lanes}")
                if lane_set is not None and lane_set.failed:
                    raise TransferError(f"another lane of this transfer failed: {lane_set.failed}")
                slot = staging.accept(frame)  # every header check, before anything is copied
                landing.progress()
                if len(fills) >= PIPELINE_DEPTH:
                    await land_oldest()
                fills.append((slot, loop.run_in_executor(None, fill, frame, slot)))
            while fills:
                await land_oldest()
            if not staging.complete:
                raise TransferError(f"the transfer ended after {staging.frames} of {staging.total_frames} frames"
                                    + (f" (lane {lane} of {lanes})" if lanes > 1 else ""))
            return Received(staging.bytes_received, staging.frames)
        finally:
            if fills:  # let the workers finish with the buffer (and the blocks) before it is dropped
                await asyncio.wait([fut for _, fut in fills])


class LaneSet:
    """Decode side: the lanes (concurrent PushKV calls, one per connection) of one gRPC transfer
    into a reservation. Lane i fills layers `lane_layers(num_layers, lanes)[i]` of one shared
    staging through its own `KVStaging`, so each lane's frames pass every per-frame check on its
    own; the transfer is complete when every lane is. A lane that fails fails the others at their
    next frame; none waits for another, so a lane that never comes leaves the reservation to its
    lease."""

    def __init__(self, landing: KVLanding, lanes: int, pin_memory: bool):
        if not 2 <= lanes <= min(MAX_KV_LANES, landing.spec.num_layers):
            raise TransferError(f"{lanes} lanes: this node takes 2 to {min(MAX_KV_LANES, landing.spec.num_layers)} "
                                f"for a cache of {landing.spec.num_layers} layers")
        self.landing, self.lanes, self.pin_memory = landing, lanes, pin_memory
        self.bounds = lane_layers(landing.spec.num_layers, lanes)
        self.joined: set[int] = set()
        self.completed = 0
        self.active = 0
        self.bytes = 0  # payload landed by the lanes that completed
        self.failed: str | None = None
        self.finished = False
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._buffers is None:
            spec = self.landing.spec
            shape = (spec.num_layers, self.landing.num_blocks, *spec.block_shape)
            self._buffers = tuple(torch.empty(shape, dtype=spec.dtype, pin_memory=self.pin_memory) for _ in "kv")
        return self._buffers

    def join(self, lane: int) -> KVStaging:
        if self.failed:
            raise TransferError(f"another lane of this transfer failed: {self.failed}")
        if lane >= self.lanes:
            raise TransferError(f"lane {lane} of a transfer over {self.lanes} lanes")
        if lane in self.joined:
            raise TransferError(f"lane {lane} of this transfer arrived twice")
        self.joined.add(lane)
        self.active += 1
        return KVStaging(self.landing.reservation_id, self.landing.spec, self.landing.num_blocks, "cpu",
                         self.pin_memory, layers=self.bounds[lane], buffers=self.buffers)

    def fail(self, lane: int, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = f"lane {lane}: {str(exc)[:200] or type(exc).__name__}"

    @property
    def ended(self) -> bool:
        """No lane is running and none will complete the transfer (failed or finished)."""
        return self.active == 0 and (self.finished or self.failed is not None)

    async def finish_lane(self) -> bool:
        """A lane completed: True if it was the last (the whole staging then went into the blocks)."""
        self.completed += 1
        if self.completed < self.lanes:
            return False
        if self.failed:
            raise TransferError(f"another lane of this transfer failed: {self.failed}")
        if self.landing.write_part is None:
            await self.landing.write(*self.buffers())
        self.finished = True
        return True


def _fill_and_write(staging: KVStaging, write_part, frame: node_pb2.KVFrame, slot) -> object:
    """Worker thread: CRC and copy into staging, then that frame's blocks into the cache."""
    staging.fill(frame, slot)
    write_part(slot.kind, slot.layer, slot.start, slot.n, staging.slot_tensor(slot))
    return slot
