"""KV over gRPC: `DecodeNode.PushKV` client stream of frames of at most 1 MiB payload."""
from __future__ import annotations

import asyncio

import grpc
import torch

from engine.kv_transfer.base import K, KVSender, KVSpec, crc32, make_header, plan_frames, tensor_bytes
from engine.rpc.channel import aio_channel
from engine.rpc.errors import Unavailable
from protos.pdserve.v1 import node_pb2, node_pb2_grpc


def grpc_frames(reservation_id: str, spec: KVSpec, k: torch.Tensor, v: torch.Tensor,
                max_frame_bytes: int | None = None):
    """The PushKV frames of one transfer, in order (a generator: one frame's bytes at a time)."""
    num_blocks = spec.check_tensors(k, v)
    plan = plan_frames(spec, num_blocks, *(() if max_frame_bytes is None else (max_frame_bytes,)))
    for seq, (kind, layer, start, n) in enumerate(plan):
        data = tensor_bytes((k if kind == K else v)[layer, start:start + n])
        yield node_pb2.KVFrame(reservation_id=reservation_id, seq=seq, total_frames=len(plan),
                               header=make_header(spec, kind, layer, start, n, crc32(data)), data=data)


class Channels:
    """One aio channel per decode address, kept open."""

    def __init__(self):
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> node_pb2_grpc.DecodeNodeStub:
        if address not in self._channels:
            self._channels[address] = aio_channel(address)
        return node_pb2_grpc.DecodeNodeStub(self._channels[address])

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()


class GrpcKVSender(KVSender):
    def __init__(self, channels: Channels | None = None):
        self.channels = channels or Channels()

    async def send(self, target: node_pb2.KVTarget, k: torch.Tensor, v: torch.Tensor, timeout: float) -> int:
        spec = KVSpec.from_proto(target.layout)
        stub = self.channels.stub(target.decode_address)
        call = stub.PushKV(timeout=timeout)
        try:
            for frame in grpc_frames(target.reservation_id, spec, k, v):
                await call.write(frame)
            await call.done_writing()
            reply = await call
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"KV transfer to the decode node failed: {exc.code().name}: "
                              f"{exc.details()}") from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        return reply.bytes_received

    async def close(self) -> None:
        await self.channels.close()
