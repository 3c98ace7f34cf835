"""DecodeNode servicer: reservations under leases, KV staging, continuous-batch decoding."""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

import torch

from engine.kv_transfer import KVStaging, TorchDistHost, TransferError
from engine.kv_transfer.torch_dist import PAIR_METADATA_KEY
from engine.rpc import convert
from engine.rpc.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from engine.rpc.node_base import NodeServicerBase, check_request_id, time_left
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc

logger = logging.getLogger("pdserve.decode")
T = node_pb2.KVTransport

DEFAULT_LEASE_MS = 30_000
MAX_LEASE_MS = 600_000
DEFAULT_KV_WAIT_MS = 30_000
HEADROOM_BLOCKS = 1


@dataclass
class Reservation:
    reservation_id: str
    request_id: str
    num_tokens: int
    block_ids: list[int]
    transport: int
    staging: KVStaging
    kv_ready: asyncio.Event = field(default_factory=asyncio.Event)
    lease: asyncio.TimerHandle | None = None
    pushing: bool = False
    decoding: bool = False


class DecodeServicer(NodeServicerBase, node_pb2_grpc.DecodeNodeServicer):
    role = "decode"

    def __init__(self, default_transport: str = "grpc"):
        super().__init__()
        self.default_transport = T.KV_TRANSPORT_TORCH_DIST if default_transport == "nccl" else T.KV_TRANSPORT_GRPC
        self.reservations: dict[str, Reservation] = {}  # reservation id -> reservation
        self.dist: TorchDistHost | None = None

    def attach(self, engine, ns) -> None:
        super().attach(engine, ns)
        self.dist = TorchDistHost(host=ns.kv_host, device=engine.engine.device)

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
            load = await engine.load()
            raise ResourceExhausted(f"not enough KV blocks: need {need} (+{headroom} headroom), "
                                    f"{load['free_blocks']} of {load['total_blocks']} free")
        transport = request.transport or self.default_transport
        device = engine.engine.device if transport == T.KV_TRANSPORT_TORCH_DIST else torch.device("cpu")
        res = Reservation(uuid.uuid4().hex, rid, n, blocks, transport,
                          KVStaging("", self.spec, len(blocks), device))
        res.staging.reservation_id = res.reservation_id
        lease_ms = min(request.lease_ms or DEFAULT_LEASE_MS, MAX_LEASE_MS)
        res.lease = asyncio.get_running_loop().call_later(lease_ms / 1000.0, self._expire, res.reservation_id)
        self.reservations[res.reservation_id] = res
        reply = node_pb2.ReserveResponse(reservation_id=res.reservation_id, num_blocks=len(blocks),
                                         layout=self.layout_proto(), node_id=self.node_id)
        if transport == T.KV_TRANSPORT_TORCH_DIST:
            reply.rendezvous = self.dist.rendezvous
        return reply

    def _expire(self, reservation_id: str) -> None:
        res = self.reservations.get(reservation_id)
        if res is not None and not res.decoding:
            logger.info("lease of reservation for %r ended before its KV and Decode arrived", res.request_id[:64])
            self.stats.leases_expired += 1
            self.spawn(self._close(res))

    async def _close(self, res: Reservation) -> bool:
        """Frees a reservation's blocks (once) and forgets it."""
        if self.reservations.pop(res.reservation_id, None) is None:
            return False
        if res.lease is not None:
            res.lease.cancel()
        res.staging.reset()
        if self.engine is not None and self.engine.healthy:
            await self.engine.free_reserved(res.block_ids)
        return True

    # ---- KV ------------------------------------------------------------------------------------
    async def PushKV(self, request_iterator, context):
        self.ready_engine()
        frames = aiter(request_iterator)
        frame = await anext(frames, None)
        if frame is None:
            raise InvalidArgument("PushKV carried no frame")
        res = self.reservations.get(frame.reservation_id)
        if res is None:
            raise NotFound("unknown or expired reservation")
        if res.pushing:
            raise InvalidArgument("a KV transfer for this reservation is already in progress")
        pair = dict(context.invocation_metadata() or ()).get(PAIR_METADATA_KEY, "")
        if res.transport == T.KV_TRANSPORT_TORCH_DIST and not pair:
            raise InvalidArgument(f"torch.distributed KV frames need the {PAIR_METADATA_KEY} metadata")
        res.pushing = True
        try:
            while frame is not None:
                if self.reservations.get(res.reservation_id) is not res:
                    raise NotFound("the reservation was freed during the transfer")
                if res.transport == T.KV_TRANSPORT_TORCH_DIST:
                    await self.dist.receive(res.staging, frame, pair, time_left(context))
                else:
                    res.staging.add_frame(frame)
                frame = await anext(frames, None)
            if not res.staging.complete:
                raise TransferError(f"the transfer ended after {res.staging.frames} of "
                                    f"{res.staging.total_frames} frames")
        except BaseException as exc:
            if isinstance(exc, TransferError):
                self.stats.rejected_frames += 1
            res.staging.reset()  # never keep partial KV
            raise
        finally:
            res.pushing = False
        self.stats.kv_transfers += 1
        self.stats.kv_transfer_bytes += res.staging.bytes_received
        res.kv_ready.set()
        return node_pb2.PushKVResponse(bytes_received=res.staging.bytes_received, frames=res.staging.frames)

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
            wait = min((request.kv_wait_ms or DEFAULT_KV_WAIT_MS) / 1000.0, time_left(context))
            try:
                await asyncio.wait_for(res.kv_ready.wait(), wait)
            except asyncio.TimeoutError:
                raise Unavailable(f"the KV did not arrive within {wait * 1000:.0f} ms") from None
            k, v = res.staging.tensors()  # complete and verified, else TransferError
            self.reservations.pop(res.reservation_id, None)
            res.lease.cancel()
            stream = await engine.import_request(rid, list(request.prompt_token_ids), request.first_token_id,
                                                 params, k, v, res.block_ids, request.priority, sample_index)
            res.staging.reset()
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
                                              sample_index)
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
        ev = node_pb2.DecodeEvent(token_ids=out.new_token_ids,
                                  finish_reason=convert.finish_reason_to_proto(out.finish_reason))
        if out.new_logprobs:
            ev.logprobs.extend(convert.logprob_to_proto(e, params.logprobs or 0) for e in out.new_logprobs)
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
        if self.dist is not None:
            self.dist.close()
