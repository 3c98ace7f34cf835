"""DecodeNode servicer: reservations under leases renewed by progress, KV receivers (one per
transport), continuous-batch decoding."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import torch

from engine.kv_transfer.base import MAX_KV_LANES
from engine.kv_transfer.grpc_transport import PUSH_KV, LaneSet, decoded_frames
from engine.kv_transfer import (TRANSPORTS, GrpcKVReceiver, IpcKVReceiver, KVLanding, KVReceiver, TorchDistHost,
                                TorchDistKVReceiver, TransferError)
from engine.rpc import convert
from engine.rpc.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from engine.node.base import NodeServicerBase, check_request_id, time_left
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc

logger = logging.getLogger("pdserve.decode")
T = node_pb2.KVTransport

DEFAULT_LEASE_MS = 30_000
MAX_LEASE_MS = 600_000
DEFAULT_KV_WAIT_MS = 30_000
HEADROOM_BLOCKS = 1
IPC_WRITE_GRACE_S = 5.0  # blocks opened for an IPC write stay out of reuse this long without a commit


@dataclass
class Reservation:
    reservation_id: str
    request_id: str
    num_tokens: int
    block_ids: list[int]
    lease_s: float  # idle budget: freed after this long without progress (before Decode)
    kv_ready: asyncio.Event = field(default_factory=asyncio.Event)
    lease: asyncio.TimerHandle | None = None
    last_progress: float = 0.0  # loop time of the last frame, commit or renewal
    bytes_received: int = 0
    pushing: bool = False
    decoding: bool = False
    writing: asyncio.Future | None = None  # a write into the blocks in flight (thread or another process)
    lanes: LaneSet | None = None  # a gRPC transfer over several PushKV calls, while it runs


class DecodeServicer(NodeServicerBase, node_pb2_grpc.DecodeNodeServicer):
    role = "decode"
    RAW_REQUESTS = (PUSH_KV,)  # frames are parsed by decode_frame, the payload read in place

    def __init__(self, default_transport: str = "auto"):
        super().__init__()
        self.default_transport = TRANSPORTS[default_transport]
        self.reservations: dict[str, Reservation] = {}  # reservation id -> reservation
        self.dist: TorchDistHost | None = None
        self.receivers: dict[int, KVReceiver] = {}

    def attach(self, engine, ns) -> None:
        super().attach(engine, ns)
        engine.held_reservation_blocks = lambda: sum(len(r.block_ids) for r in list(self.reservations.values()))
        device = engine.engine.device
        self.dist = TorchDistHost(host=ns.kv_host, device=device)
        self.receivers = {T.KV_TRANSPORT_GRPC: GrpcKVReceiver(device), T.KV_TRANSPORT_NCCL: TorchDistKVReceiver(self.dist),
                          T.KV_TRANSPORT_IPC: IpcKVReceiver(engine.engine.kv_caches, self.spec)}

    async def probe(self) -> None:
        """Imports zero KV for a 3-token prompt and decodes one token through the model."""
        engine = self.ready_engine()
        blocks = await engine.reserve(3)
        if blocks is None:
            raise RuntimeError("no KV blocks for the probe")
        shape = (self.spec.num_layers, len(blocks), *self.spec.block_shape)
        zeros = torch.zeros(shape, dtype=self.spec.dtype)
        stream = await engine.import_request("\x00probe", [1, 2, 3], 4, SamplingParams(temperature=0, max_tokens=2),
                                             zeros, zeros, blocks)
        async for out in stream:
            if out.finish_reason == "error":
                raise RuntimeError("probe generation failed")

    def _offers_nccl(self, transport: int) -> bool:
        """NCCL is offered when asked for, and under auto when the cache is on CUDA."""
        return transport == T.KV_TRANSPORT_NCCL or (transport == T.KV_TRANSPORT_AUTO
                                                    and self.engine.engine.device.type == "cuda")

    # ---- reservations ------------------------------------------------------------------------------
    async def Reserve(self, request: node_pb2.ReserveRequest, context):
        engine = self.ready_engine()
        rid = check_request_id(request.request_id)
        n = request.num_prompt_tokens
        if not 1 <= n < self.max_model_len:
            raise InvalidArgument(f"num_prompt_tokens must be in [1, {self.max_model_len}), got {n}")
        if any(r.request_id == rid for r in self.reservations.values()):
            raise InvalidArgument(f"request id {rid[:64]!r} already holds a reservation")
        bm = engine.engine.block_manager
        need = bm.blocks_needed(n)
        if request.num_output_tokens:
            total = min(n + request.num_output_tokens, self.max_model_len)
            headroom = bm.blocks_needed(total) - need
        else:
            headroom = HEADROOM_BLOCKS
        blocks = await engine.reserve(n, headroom_blocks=headroom)
        if blocks is None:
            self.stats.reservations_refused += 1
            load = engine.load_snapshot()
            raise ResourceExhausted(f"not enough KV blocks: need {need} (+{headroom} headroom), "
                                    f"{load['free_blocks']} of {load['total_blocks']} free")
        lease_ms = min(request.lease_ms or DEFAULT_LEASE_MS, MAX_LEASE_MS)
        res = Reservation(uuid.uuid4().hex, rid, n, blocks, lease_ms / 1000.0)
        self.reservations[res.reservation_id] = res
        self._renew(res)
        reply = node_pb2.ReserveResponse(reservation_id=res.reservation_id, num_blocks=len(blocks),
                                         layout=self.layout_proto(), node_id=self.node_id, lease_ms=lease_ms,
                                         kv_lanes=min(MAX_KV_LANES, self.spec.num_layers))
        if self._offers_nccl(request.transport or self.default_transport):
            reply.rendezvous = self.dist.rendezvous
        return reply

    def _renew(self, res: Reservation) -> None:
        """Progress (a frame, a commit, a renewal): the lease runs its full budget from now."""
        loop = asyncio.get_running_loop()
        res.last_progress = loop.time()
        if res.lease is not None:
            res.lease.cancel()
        res.lease = loop.call_later(res.lease_s, self._expire, res.reservation_id)

    def _expire(self, reservation_id: str) -> None:
        res = self.reservations.get(reservation_id)
        if res is not None and not res.decoding:
            logger.info("lease of reservation for %r ended: no progress for %.0f ms before its KV and Decode "
                        "arrived", res.request_id[:64], res.lease_s * 1000)
            self.stats.leases_expired += 1
            self.spawn(self._close(res))

    async def _close(self, res: Reservation) -> bool:
        """Frees a reservation's blocks (once, after any write into them ended) and forgets it."""
        if self.reservations.pop(res.reservation_id, None) is None:
            return False
        if res.lease is not None:
            res.lease.cancel()
        if res.writing is not None and not res.writing.done():
            await asyncio.wait([res.writing], timeout=IPC_WRITE_GRACE_S)
        if self.engine is not None and self.engine.healthy:
            await self.engine.free_reserved(res.block_ids)
        return True

    def _live(self, reservation_id: str) -> Reservation:
        res = self.reservations.get(reservation_id)
        if res is None:
            raise NotFound("unknown or expired reservation")
        return res

    async def RenewLease(self, request: node_pb2.RenewLeaseRequest, context):
        res = self._live(request.reservation_id)
        self._renew(res)
        reply = node_pb2.RenewLeaseResponse(lease_ms=int(res.lease_s * 1000))
        if request.ipc_write:
            if res.kv_ready.is_set() or self._in_transfer(res):
                raise InvalidArgument("the reservation's KV is already complete or arriving")
            if not self.receivers[T.KV_TRANSPORT_IPC].shared:
                raise InvalidArgument("no CUDA IPC handles were handed out by this node (call ShareKV first)")
            loop = asyncio.get_running_loop()
            res.writing = loop.create_future()  # the blocks stay out of reuse until CommitKV or the grace
            loop.call_later(IPC_WRITE_GRACE_S, self._end_ipc_write, res)
            reply.block_ids.extend(res.block_ids)
        return reply

    @staticmethod
    def _in_transfer(res: Reservation) -> bool:
        return res.pushing or (res.writing is not None and not res.writing.done())

    @staticmethod
    def _end_ipc_write(res: Reservation) -> None:
        if res.writing is not None and not res.writing.done():
            res.writing.set_result(None)

    # ---- KV ------------------------------------------------------------------------------------
    async def ShareKV(self, request, context):
        self.ready_engine()
        return self.receivers[T.KV_TRANSPORT_IPC].share()

    async def PushKV(self, request_iterator, context):
        self.ready_engine()
        frames = decoded_frames(request_iterator)  # raw bytes: the payload is read in place (see decode_frame)
        frame = await anext(frames, None)
        if frame is None:
            raise InvalidArgument("PushKV carried no frame")
        res = self._live(frame.reservation_id)
        nccl = TorchDistKVReceiver.announced(context)
        if frame.lanes > 1 and not nccl:
            return await self._receive_lane(res, frame, _chain(frame, frames))
        return await self._receive(res, self.receivers[T.KV_TRANSPORT_NCCL if nccl else T.KV_TRANSPORT_GRPC],
                                   _chain(frame, frames), context)

    async def CommitKV(self, request: node_pb2.KVCommit, context):
        self.ready_engine()
        res = self._live(request.reservation_id)
        if res.writing is None or res.writing.done():
            raise InvalidArgument("CommitKV without an open CUDA IPC write (RenewLease with ipc_write first)")
        self._end_ipc_write(res)  # the prefill node synchronized its copies before committing
        return await self._receive(res, self.receivers[T.KV_TRANSPORT_IPC], request, context)

    async def _receive(self, res: Reservation, receiver: KVReceiver, request, context) -> node_pb2.PushKVResponse:
        """One transfer into `res` through `receiver`; partial KV is never kept."""
        if res.kv_ready.is_set():
            self.stats.rejected_frames += 1
            raise TransferError("the reservation's KV is already complete (replayed frame)")
        if self._in_transfer(res):
            raise InvalidArgument("a KV transfer for this reservation is already in progress")
        res.pushing = True
        write_part = self._part_writer(res) if receiver.transport == T.KV_TRANSPORT_GRPC else None
        if write_part is not None:  # frames go into the blocks as they land: the blocks stay out of reuse until
            res.writing = asyncio.get_running_loop().create_future()  # every such write ended
        landing = KVLanding(res.reservation_id, self.spec, len(res.block_ids),
                            progress=lambda: self._on_progress(res), write=lambda k, v: self._write(res, k, v),
                            write_part=write_part)
        try:
            got = await receiver.receive(landing, request, context)
        except TransferError:
            self.stats.rejected_frames += 1
            raise
        finally:
            res.pushing = False
            if write_part is not None and not res.writing.done():
                res.writing.set_result(None)  # receive() returns only after its last write ended
        if receiver.transport == T.KV_TRANSPORT_GRPC:
            self.stats.kv_transfer_streams += 1
        self._transfer_done(res, got.bytes)
        return node_pb2.PushKVResponse(bytes_received=got.bytes, frames=got.frames)

    async def _receive_lane(self, res: Reservation, first: node_pb2.KVFrame, frames) -> node_pb2.PushKVResponse:
        """One lane of a gRPC transfer over several PushKV calls (`LaneSet`): the first lane to
        arrive opens the transfer, the one that completes it makes the KV ready."""
        if res.kv_ready.is_set():
            self.stats.rejected_frames += 1
            raise TransferError("the reservation's KV is already complete (replayed frame)")
        lanes = res.lanes
        if lanes is None:
            if self._in_transfer(res):
                raise InvalidArgument("a KV transfer for this reservation is already in progress")
            write_part = self._part_writer(res)
            landing = KVLanding(res.reservation_id, self.spec, len(res.block_ids),
                                progress=lambda: self._on_progress(res), write=lambda k, v: self._write(res, k, v),
                                write_part=write_part)
            try:
                lanes = LaneSet(landing, first.lanes, self.receivers[T.KV_TRANSPORT_GRPC].pin_memory)
            except TransferError:
                self.stats.rejected_frames += 1
                raise
            res.lanes, res.pushing = lanes, True
        elif first.lanes != lanes.lanes:
            self.stats.rejected_frames += 1
            raise TransferError(f"lane {first.lane} says {first.lanes} lanes; the transfer has {lanes.lanes}")
        if lanes.active == 0 and lanes.landing.write_part is not None:
            res.writing = asyncio.get_running_loop().create_future()  # blocks out of reuse while lanes write
        try:
            got, last = await self.receivers[T.KV_TRANSPORT_GRPC].receive_lane(lanes, first.lane, frames)
        except TransferError:
            self.stats.rejected_frames += 1
            raise
        finally:
            if lanes.active == 0 and lanes.landing.write_part is not None and not res.writing.done():
                res.writing.set_result(None)  # no lane is writing into the blocks now
            if lanes.ended and res.lanes is lanes:
                res.lanes, res.pushing = None, False  # failed: a new transfer may start over
        self.stats.kv_transfer_streams += 1
        if last:
            self._transfer_done(res, lanes.bytes)
        return node_pb2.PushKVResponse(bytes_received=got.bytes, frames=got.frames)

    def _transfer_done(self, res: Reservation, nbytes: int) -> None:
        """Every block of the transfer is in: the KV is ready for Decode."""
        if self.reservations.get(res.reservation_id) is not res:
            raise NotFound("the reservation was freed during the transfer")
        res.bytes_received = nbytes
        self.stats.kv_transfers += 1
        self.stats.kv_transfer_bytes += nbytes
        res.kv_ready.set()

    def _on_progress(self, res: Reservation) -> None:
        if self.reservations.get(res.reservation_id) is not res:
            raise NotFound("the reservation was freed during the transfer")
        self._renew(res)

    def _part_writer(self, res: Reservation):
        """Worker-thread writer of one frame's blocks into `res` (None: the engine takes whole transfers)."""
        write = self.engine.engine.write_reserved_part
        if write is None:
            return None
        block_ids = res.block_ids

        def write_part(kind: int, layer: int, start: int, n: int, data: torch.Tensor) -> None:
            write(block_ids[start:start + n], kind, layer, data)
        return write_part

    async def _write(self, res: Reservation, k: torch.Tensor, v: torch.Tensor) -> None:
        """The received KV into the reserved blocks on a worker thread; `_close` waits for it."""
        if self.reservations.get(res.reservation_id) is not res:
            raise NotFound("the reservation was freed during the transfer")
        res.writing = asyncio.get_running_loop().run_in_executor(
            None, self.engine.engine.write_reserved, res.block_ids, k, v)
        await asyncio.shield(res.writing)

    async def _wait_kv(self, res: Reservation, budget: float, context) -> None:
        """Waits for the reservation's KV; fails after `budget` seconds without progress."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not res.kv_ready.is_set():
            idle = loop.time() - max(res.last_progress, start)
            left = min(budget - idle, time_left(context))
            if left <= 0:
                raise Unavailable(f"the KV made no progress for {budget * 1000:.0f} ms "
                                  f"({'arriving' if res.pushing else 'not started'})")
            try:
                await asyncio.wait_for(res.kv_ready.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def KVRendezvous(self, request: node_pb2.KVStoreRequest, context):
        """The NCCL pair's store (the prefill rank's calls), in the pair key's namespace."""
        if self.dist is None:
            raise Unavailable("the decode node is not ready")
        return await self.dist.serve_store(request, context)

    # ---- decoding ------------------------------------------------------------------------------
    async def Decode(self, request: node_pb2.DecodeRequest, context):
        if request.local_prefill:
            async for event in self._decode_local(request):
                yield event
            return
        engine = self.ready_engine()
        rid = check_request_id(request.request_id)
        res = self.reservations.get(request.reservation_id)
        if res is None:
            raise NotFound("unknown or expired reservation")
        if res.request_id != rid:
            raise InvalidArgument("the reservation belongs to another request")
        if res.decoding:
            raise InvalidArgument("the reservation is already decoding")
        if len(request.prompt_token_ids) != res.num_tokens:
            raise InvalidArgument(f"the prompt has {len(request.prompt_token_ids)} tokens; the reservation "
                                  f"covers {res.num_tokens}")
        params, sample_index = convert.params_from_proto(request.params)
        res.decoding = True  # the lease no longer applies: the stream (and its deadline) owns the request
        tracked = self.track(rid)
        self.stats.requests += 1
        done = False
        try:
            await self._wait_kv(res, (request.kv_wait_ms or DEFAULT_KV_WAIT_MS) / 1000.0, context)
            self.reservations.pop(res.reservation_id, None)
            res.lease.cancel()
            # complete and verified: the receiver wrote it into the reserved blocks
            stream = await engine.import_request(rid, list(request.prompt_token_ids), request.first_token_id,
                                                 params, None, None, res.block_ids, request.priority, sample_index)
            async for out in stream:
                if out.finish_reason == "error":
                    raise Unavailable("the decode node's engine failed")
                self.stats.generation_tokens += len(out.new_token_ids)
                done = out.finished  # the engine is done with it even if the client leaves now
                yield self._event(out, params)
            done = True
        finally:
            self.end_rpc(rid, tracked, done, lambda: self._abort(rid, res))

    async def _decode_local(self, request: node_pb2.DecodeRequest):
        """Colocated serving: the prompt runs in this node's own batch (chunked prefill beside the
        running decodes); no reservation, no KV transfer; every token is streamed, the first included."""
        engine = self.ready_engine()
        rid = check_request_id(request.request_id)
        params, sample_index = convert.params_from_proto(request.params)
        tracked = self.track(rid)
        self.stats.requests += 1
        done = False
        try:
            stream = await engine.add_request(rid, list(request.prompt_token_ids), params, request.priority,
                                              sample_index, output_token_ids=list(request.output_token_ids))
            first = True
            async for out in stream:
                if out.finish_reason == "error":
                    raise Unavailable("the decode node's engine failed")
                if out.finish_reason == "abort":
                    raise Cancelled("the request was aborted")
                event = self._event(out, params)
                if first:
                    first = False
                    self.stats.prompt_tokens += len(request.prompt_token_ids)
                    self.stats.cached_tokens += out.num_cached_tokens
                    event.cached_tokens = out.num_cached_tokens
                self.stats.generation_tokens += len(out.new_token_ids)
                done = out.finished
                yield event
            done = True
        finally:
            self.end_rpc(rid, tracked, done, lambda: self._abort(rid))

    @staticmethod
    def _event(out, params: SamplingParams) -> node_pb2.DecodeEvent:
        ev = node_pb2.DecodeEvent(token_ids=out.new_token_ids, text=out.text_delta, held_text=out.held_text,
                                  finish_reason=convert.finish_reason_to_proto(out.finish_reason))
        if out.new_logprobs:
            ev.logprobs.extend(convert.logprob_to_proto(e, params.logprobs or 0) for e in out.new_logprobs)
        if out.prompt_logprobs is not None:  # local prefill: computed here, with the first token
            ev.prompt_logprobs.extend(convert.prompt_logprobs_to_proto(out.prompt_logprobs, params.prompt_logprobs or 0))
        if isinstance(out.stop_reason, str):
            ev.stop_sequence = out.stop_reason
        elif isinstance(out.stop_reason, int):
            ev.stop_token_id = out.stop_reason
        return ev

    async def _abort(self, rid: str, res: Reservation | None = None) -> bool:
        found = False
        for r in [r for r in self.reservations.values() if r.request_id == rid or r is res]:
            found |= await self._close(r)
        if self.engine is not None and self.engine.healthy:
            found |= await self.engine.abort(rid)
        return found

    async def Abort(self, request: node_pb2.NodeAbortRequest, context):
        rid = check_request_id(request.request_id)
        cancelled = self.cancel_active(rid)
        found = await self._abort(rid)
        return node_pb2.NodeAbortResponse(found=found or cancelled)

    async def GetLoad(self, request, context):
        return await self.load_proto()

    async def load_proto(self) -> generation_pb2.NodeLoad:
        load = await self.load_dict()
        return self.node_load(load, {r.request_id for r in self.reservations.values()}, len(self.reservations))

    async def close(self) -> None:
        await super().close()
        for res in list(self.reservations.values()):
            await self._close(res)
        for receiver in self.receivers.values():
            receiver.close()


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item
