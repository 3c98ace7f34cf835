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
import zlib

import grpc
import torch

from engine.kv_transfer.base import (K, MAX_FRAME_BYTES, T, KVLanding, KVReceiver, KVSender, KVSpec, Received,
                                     make_header, plan_frames)
from engine.kv_transfer.staging import KVStaging, TransferError
from engine.rpc.channel import NODE_KEEPALIVE, aio_channel
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


@torch.inference_mode()
def to_host(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V in host memory, contiguous: on CUDA one asynchronous copy each into pinned memory on
    a side stream (waited for here, on the calling worker thread)."""
    if k.device.type != "cuda":
        return k.contiguous(), v.contiguous()
    stream = torch.cuda.Stream(k.device)
    stream.wait_stream(torch.cuda.current_stream(k.device))
    with torch.cuda.stream(stream):
        host = []
        for t in (k, v):
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host.append(h)
    stream.synchronize()
    return host[0], host[1]


def encode_frame(reservation_id: str, spec: KVSpec, k: torch.Tensor, v: torch.Tensor, plan: list, seq: int) -> bytes:
    """The serialized PushKV frame `seq` of `plan` (host tensors): header fields, then the payload
    appended as field 5 (one copy of the payload; protobuf accepts fields in any order)."""
    p = plan[seq]
    src = (k if p.kind == K else v)[p.layer:p.layer + p.layers, p.start:p.start + p.n]
    payload = memoryview(src.contiguous().view(torch.uint8).reshape(-1).numpy())
    header = make_header(spec, p.kind, p.layer, p.start, p.n, zlib.crc32(payload) & 0xFFFFFFFF, p.layers)
    head = node_pb2.KVFrame(reservation_id=reservation_id, seq=seq, total_frames=len(plan),
                            header=header).SerializeToString()
    return b"".join((head, _DATA_TAG, _varint(len(payload)), payload))


def grpc_frames(reservation_id: str, spec: KVSpec, k: torch.Tensor, v: torch.Tensor,
                max_frame_bytes: int | None = None):
    """The PushKV frames of one transfer as messages, in order (a generator; tests and tools)."""
    num_blocks = spec.check_tensors(k, v)
    k, v = to_host(k, v)
    plan = plan_frames(spec, num_blocks, *(() if max_frame_bytes is None else (max_frame_bytes,)))
    for seq in range(len(plan)):
        yield node_pb2.KVFrame.FromString(encode_frame(reservation_id, spec, k, v, plan, seq))


class Channels:
    """One aio channel per decode address, kept open."""

    def __init__(self, security: ClientSecurity | None = None):
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.security = security  # the node key and TLS this node calls its peers with

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = aio_channel(address, options=NODE_KEEPALIVE, security=self.security)
        return self._channels[address]

    def stub(self, address: str) -> node_pb2_grpc.DecodeNodeStub:
        return node_pb2_grpc.DecodeNodeStub(self.channel(address))

    def push_kv_raw(self, address: str):
        """PushKV taking frames already serialized (bytes), so no payload is encoded on the loop."""
        return self.channel(address).stream_unary(PUSH_KV, request_serializer=None,
                                                  response_deserializer=node_pb2.PushKVResponse.FromString)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()


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


class GrpcKVSender(KVSender):
    transport = T.KV_TRANSPORT_GRPC

    def __init__(self, channels: Channels | None = None, max_frame_bytes: int = MAX_FRAME_BYTES):
        self.channels = channels or Channels()
        self.max_frame_bytes = max_frame_bytes

    async def send(self, target: node_pb2.KVTarget, k: torch.Tensor, v: torch.Tensor, timeout: float) -> int:
        spec = KVSpec.from_proto(target.layout)
        num_blocks = spec.check_tensors(k, v)
        loop = asyncio.get_running_loop()
        k, v = await loop.run_in_executor(None, to_host, k, v)
        plan = plan_frames(spec, num_blocks, self.max_frame_bytes)
        build = functools.partial(encode_frame, target.reservation_id, spec, k, v, plan)
        call = self.channels.push_kv_raw(target.decode_address)(timeout=timeout)
        ahead = collections.deque(loop.run_in_executor(None, build, seq)
                                  for seq in range(min(PIPELINE_DEPTH, len(plan))))
        try:
            for seq in range(len(plan)):
                data = await ahead.popleft()
                if seq + PIPELINE_DEPTH < len(plan):  # built while this frame is written
                    ahead.append(loop.run_in_executor(None, build, seq + PIPELINE_DEPTH))
                await asyncio.wait_for(call.write(data), frame_budget(len(data)))
            await call.done_writing()
            reply = await call
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError) as exc:
            raise Unavailable(f"KV transfer to the decode node failed: {await call_failure(call, exc)}") from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            for fut in ahead:
                fut.cancel()
        return reply.bytes_received

    async def close(self) -> None:
        await self.channels.close()


class GrpcKVReceiver(KVReceiver):
    """Frames land in host staging (pinned when the cache is on CUDA), then one copy of K and V goes
    into the reserved blocks."""

    transport = T.KV_TRANSPORT_GRPC

    def __init__(self, cache_device: torch.device):
        self.pin_memory = cache_device.type == "cuda"

    async def receive(self, landing: KVLanding, frames, context) -> Received:
        staging = KVStaging(landing.reservation_id, landing.spec, landing.num_blocks, "cpu", self.pin_memory)
        loop = asyncio.get_running_loop()
        fills: collections.deque = collections.deque()

        async def land_oldest():
            slot = await fills[0][1]
            fills.popleft()
            staging.landed(slot)
        try:
            async for frame in frames:
                slot = staging.accept(frame)  # every header check, before anything is copied
                landing.progress()
                if len(fills) >= PIPELINE_DEPTH:
                    await land_oldest()
                fills.append((slot, loop.run_in_executor(None, staging.fill, frame, slot)))
            while fills:
                await land_oldest()
            if not staging.complete:
                raise TransferError(f"the transfer ended after {staging.frames} of {staging.total_frames} frames")
            await landing.write(staging.k, staging.v)
            return Received(staging.bytes_received, staging.frames)
        finally:
            if fills:  # let the workers finish with the buffer before it is dropped
                await asyncio.wait([fut for _, fut in fills])
