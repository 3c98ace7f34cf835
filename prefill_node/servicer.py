"""PrefillNode servicer: proto -> AsyncEngine (role prefill) -> proto, then KV to the decode node.

While a request with a KV target waits in the queue, prefills and ships its KV, this node renews
the decode node's lease on its reservation (RenewLease every third of the lease), so the lease
measures silence, not work: a dead prefill node stops renewing and the decode node frees the blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from engine.kv_transfer import TRANSPORTS, GrpcKVSender, IpcKVSender, KVSender, TorchDistKVSender
from engine.kv_transfer.grpc_transport import Channels
from engine.rpc import convert
from engine.rpc.errors import Cancelled, FailedPrecondition, Unavailable
from engine.rpc.security import Security
from engine.node.base import NodeServicerBase, check_request_id, time_left
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc

logger = logging.getLogger("pdserve.prefill")
T = node_pb2.KVTransport
RENEW_TIMEOUT_S = 2.0
RENEW_RETRY_S = 0.5
STREAM_POLL_S = 0.005  # how often a streamed transfer asks the engine for newly computed blocks


class PrefillServicer(NodeServicerBase, node_pb2_grpc.PrefillNodeServicer):
    role = "prefill"

    def __init__(self, default_transport: str = "auto"):
        super().__init__()
        self.default_transport = TRANSPORTS[default_transport]
        self.senders: dict[int, KVSender] = {}
        self.channels = Channels()
        self.transfers_in_flight = 0
        self.stream_chunks = False  # --kv-stream-chunks

    def attach(self, engine, ns) -> None:
        super().attach(engine, ns)
        self.channels.security = Security.from_args(ns).client  # PushKV carries the node key / TLS
        self.stream_chunks = bool(getattr(ns, "kv_stream_chunks", False))
        device = engine.engine.device
        self.senders = {
            T.KV_TRANSPORT_GRPC: GrpcKVSender(self.channels, lanes=getattr(ns, "kv_grpc_lanes", 1)),
            T.KV_TRANSPORT_NCCL: TorchDistKVSender(ns.node_id, device, host=ns.kv_host, channels=self.channels),
            T.KV_TRANSPORT_IPC: IpcKVSender(self.channels, device),
        }

    async def choose_sender(self, target: node_pb2.KVTarget) -> KVSender:
        """The target's transport; `auto`: ipc when the decode node shares our host and GPU set, else
        nccl when it handed out a rendezvous (its KVRendezvous store, offered when its cache is on
        CUDA), else grpc."""
        transport = target.transport or self.default_transport
        if transport == T.KV_TRANSPORT_AUTO:
            if await self.senders[T.KV_TRANSPORT_IPC].usable(target.decode_address):
                transport = T.KV_TRANSPORT_IPC
            elif target.rendezvous:
                transport = T.KV_TRANSPORT_NCCL
            else:
                transport = T.KV_TRANSPORT_GRPC
        sender = self.senders.get(transport)
        if sender is None:
            raise ValueError(f"unknown KV transport {transport}")
        return sender

    async def probe(self) -> None:
        """One real prompt through the model; raises if the forward pass fails."""
        engine = self.ready_engine()
        stream = await engine.add_request("\x00probe", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1))
        async for out in stream:
            if out.finish_reason == "error":
                raise RuntimeError("probe generation failed")
        await engine.abort("\x00probe")

    # ---- RPCs ----------------------------------------------------------------------------------
    async def Prefill(self, request: node_pb2.PrefillRequest, context):
        engine = self.ready_engine()
        rid = check_request_id(request.request_id)
        params, sample_index = convert.params_from_proto(request.params)
        start = time.monotonic()
        tracked = self.track(rid)
        self.stats.requests += 1
        done = False
        loop = asyncio.get_running_loop()
        lease = loop.create_task(self._keep_lease(request.target)) if request.HasField("target") else None
        prefilled = loop.create_future()  # True once the prompt's KV is complete and held for export
        streamed: asyncio.Task | None = None
        try:
            stream = await engine.add_request(rid, list(request.prompt_token_ids), params, request.priority,
                                              sample_index)
            if request.HasField("target"):  # a prompt of several chunks: its KV leaves chunk by chunk
                streamed = await self._start_streamed(rid, request, prefilled, context)
            out = await anext(stream)
            prefilled.set_result(out.finish_reason == "prefilled")
            self.stats.prompt_tokens += len(request.prompt_token_ids)
            self.stats.cached_tokens += out.num_cached_tokens
            self.stats.generation_tokens += len(out.new_token_ids)
            if out.finish_reason == "error":
                raise Unavailable("the prefill node's engine failed")
            if out.finish_reason == "abort":
                raise Cancelled("the request was aborted")
            yield node_pb2.PrefillEvent(first_token=self._first_token(out, params, start))
            if out.finish_reason != "prefilled":  # the first token ended it: the engine freed the KV
                done = True
                return
            if not request.HasField("target"):
                await engine.release(rid)
                done = True
                return
            if streamed is not None:
                bytes_sent, ms, transport = await streamed
            else:
                bytes_sent, ms, transport = await self._transfer(rid, request.target, context)
            done = True
            yield node_pb2.PrefillEvent(transfer_done=node_pb2.TransferDone(bytes=bytes_sent, ms=ms,
                                                                            transport=transport))
        finally:
            if not prefilled.done():
                prefilled.set_result(False)
            if streamed is not None and not streamed.done():
                streamed.cancel()  # cancels its PushKV call; the decode node drops what arrived
            if lease is not None:
                lease.cancel()
            self.end_rpc(rid, tracked, done, lambda: engine.abort(rid))  # abort frees queued, running or held KV

    async def _keep_lease(self, target: node_pb2.KVTarget) -> None:
        """Renews the decode node's lease on `target` until cancelled (the transfer ended)."""
        stub = self.channels.stub(target.decode_address)
        request = node_pb2.RenewLeaseRequest(reservation_id=target.reservation_id)
        while True:
            try:
                reply = await stub.RenewLease(request, timeout=RENEW_TIMEOUT_S)
                interval = min(max(reply.lease_ms / 3000.0, 0.05), 2.0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    logger.info("reservation %s on %s is gone; no more renewals", target.reservation_id[:16],
                                target.decode_address)
                    return
                interval = RENEW_RETRY_S  # the transfer itself reports an unreachable decode node
            await asyncio.sleep(interval)

    async def _transfer(self, rid: str, target: node_pb2.KVTarget, context) -> tuple[int, float, int]:
        sender = await self.choose_sender(target)
        kv = await self.engine.export_kv(rid)  # the engine's blocks are free from here on
        self.transfers_in_flight += 1
        t0 = time.monotonic()
        try:
            sent = await sender.send(target, kv.k, kv.v, timeout=time_left(context))
        except (Unavailable, FailedPrecondition):
            self.stats.kv_transfer_failures += 1
            raise  # one log line, by the error interceptor
        finally:
            self.transfers_in_flight -= 1
        seconds = time.monotonic() - t0
        self.stats.kv_transfers += 1
        self.stats.kv_transfer_bytes += sent
        self.stats.kv_transfer_seconds += seconds
        return sent, seconds * 1000.0, sender.transport

    async def _start_streamed(self, rid: str, request: node_pb2.PrefillRequest, prefilled: asyncio.Future,
                              context) -> asyncio.Task | None:
        """When the prompt spans several prefill chunks and its KV goes over gRPC: a task that sends
        the KV of every finished chunk while later chunks are still computed (then the rest), and
        returns what `_transfer` returns; None otherwise (one chunk: nothing to overlap), and
        unless --kv-stream-chunks is on."""
        if not self.stream_chunks:
            return None
        sender = await self.choose_sender(request.target)
        if not isinstance(sender, GrpcKVSender):
            return None  # ipc moves a whole prompt in milliseconds; nccl takes whole transfers
        eng = self.engine.engine
        block_size = eng.cache_config.block_size
        chunk_blocks = eng.scheduler_config.max_num_batched_tokens // block_size
        num_blocks = -(-len(request.prompt_token_ids) // block_size)
        if chunk_blocks < 1 or num_blocks <= chunk_blocks:
            return None
        range_blocks = max(1, min(chunk_blocks, sender.max_frame_bytes // self.spec.block_bytes))
        task = asyncio.get_running_loop().create_task(
            self._transfer_streamed(rid, request.target, sender, num_blocks, range_blocks, prefilled, context))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read by Prefill, unless it left first
        return task

    async def _transfer_streamed(self, rid: str, target: node_pb2.KVTarget, sender: GrpcKVSender, num_blocks: int,
                                 range_blocks: int, prefilled: asyncio.Future, context) -> tuple[int, float, int]:
        engine = self.engine
        early = {"blocks": 0}
        done_at: dict[str, float] = {}

        async def parts():
            sent = 0
            while not prefilled.done():  # the KV of chunks computed so far, a frame's block range at a time
                part = await engine.export_computed_kv(rid, sent, range_blocks)
                if part is not None:
                    yield part
                    sent = part[0] + part[1].shape[1]
                    early["blocks"] = sent
                else:
                    await asyncio.wait([prefilled], timeout=STREAM_POLL_S)
            if not prefilled.result():
                raise Cancelled("the prompt ended without KV to move")
            done_at["prefilled"] = time.monotonic()
            kv = await engine.export_kv(rid, sent)  # the rest; the engine's blocks are free from here on
            if kv.k.shape[1]:
                yield sent, kv.k, kv.v

        self.transfers_in_flight += 1
        t0 = time.monotonic()
        try:
            sent = await sender.send_parts(target, parts(), num_blocks, timeout=time_left(context))
        except (Unavailable, FailedPrecondition):
            self.stats.kv_transfer_failures += 1
            raise  # one log line, by the error interceptor
        finally:
            self.transfers_in_flight -= 1
        end = time.monotonic()
        self.stats.kv_transfers += 1
        self.stats.kv_transfer_bytes += sent
        self.stats.kv_transfer_early_bytes += sent * early["blocks"] // num_blocks
        self.stats.kv_transfer_seconds += end - t0
        # TransferDone.ms: what the decode node waits for after the prompt is prefilled
        return sent, (end - done_at.get("prefilled", t0)) * 1000.0, sender.transport

    def _first_token(self, out, params: SamplingParams, start: float) -> node_pb2.FirstToken:
        msg = node_pb2.FirstToken(token_id=out.new_token_ids[0],
                                  finish_reason=convert.finish_reason_to_proto(out.finish_reason),
                                  cached_tokens=out.num_cached_tokens, text=out.text_delta,
                                  held_text=out.held_text, prefill_ms=(time.monotonic() - start) * 1000.0)
        if out.new_logprobs:
            msg.logprob.CopyFrom(convert.logprob_to_proto(out.new_logprobs[0], params.logprobs or 0))
        if out.prompt_logprobs is not None:
            msg.prompt_logprobs.extend(convert.prompt_logprobs_to_proto(out.prompt_logprobs, params.prompt_logprobs or 0))
        if isinstance(out.stop_reason, str):
            msg.stop_sequence = out.stop_reason
        elif isinstance(out.stop_reason, int):
            msg.stop_token_id = out.stop_reason
        return msg

    async def Abort(self, request: node_pb2.NodeAbortRequest, context):
        rid = check_request_id(request.request_id)
        cancelled = self.cancel_active(rid)
        found = await self.engine.abort(rid) if self.engine is not None and self.engine.healthy else False
        return node_pb2.NodeAbortResponse(found=found or cancelled)

    async def GetLoad(self, request, context):
        return await self.load_proto()

    async def load_proto(self) -> generation_pb2.NodeLoad:
        load = await self.load_dict()
        return self.node_load(load, set(), load.get("num_prefilled_held", 0) + self.transfers_in_flight)

    async def close(self) -> None:
        await super().close()
        for sender in self.senders.values():
            with contextlib.suppress(Exception):
                await sender.close()
        await self.channels.close()
