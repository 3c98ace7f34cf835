"""PrefillNode servicer: proto -> AsyncEngine (role prefill) -> proto, then KV to the decode node."""
from __future__ import annotations

import logging
import time


from engine.kv_transfer import GrpcKVSender, TorchDistKVSender
from engine.kv_transfer.grpc_transport import Channels
from engine.rpc import convert
from engine.rpc.errors import Cancelled, Unavailable
from engine.rpc.node_base import NodeServicerBase, check_request_id, time_left
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc

logger = logging.getLogger("pdserve.prefill")
T = node_pb2.KVTransport


class PrefillServicer(NodeServicerBase, node_pb2_grpc.PrefillNodeServicer):
    role = "prefill"

    def __init__(self, default_transport: str = "grpc"):
        super().__init__()
        self.default_transport = T.KV_TRANSPORT_TORCH_DIST if default_transport == "nccl" else T.KV_TRANSPORT_GRPC
        self.senders = {}
        self.transfers_in_flight = 0

    def attach(self, engine, ns) -> None:
        super().attach(engine, ns)
        channels = Channels()
        self.senders = {
            T.KV_TRANSPORT_GRPC: GrpcKVSender(channels),
            T.KV_TRANSPORT_TORCH_DIST: TorchDistKVSender(ns.node_id, engine.engine.device, host=ns.kv_host,
                                                         channels=channels),
        }

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
        try:
            stream = await engine.add_request(rid, list(request.prompt_token_ids), params, request.priority,
                                              sample_index)
            out = await anext(stream)
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
            bytes_sent, ms = await self._transfer(rid, request.target, context)
            done = True
            yield node_pb2.PrefillEvent(transfer_done=node_pb2.TransferDone(bytes=bytes_sent, ms=ms))
        finally:
            self.end_rpc(rid, tracked, done, lambda: engine.abort(rid))  # abort frees queued, running or held KV

    async def _transfer(self, rid: str, target: node_pb2.KVTarget, context) -> tuple[int, float]:
        transport = target.transport or self.default_transport
        sender = self.senders.get(transport)
        if sender is None:
            raise ValueError(f"unknown KV transport {transport}")
        kv = await self.engine.export_kv(rid)  # the engine's blocks are free from here on
        self.transfers_in_flight += 1
        t0 = time.monotonic()
        try:
            sent = await sender.send(target, kv.k, kv.v, timeout=time_left(context))
        except Unavailable:
            self.stats.kv_transfer_failures += 1
            raise
        finally:
            self.transfers_in_flight -= 1
        seconds = time.monotonic() - t0
        self.stats.kv_transfers += 1
        self.stats.kv_transfer_bytes += sent
        self.stats.kv_transfer_seconds += seconds
        return sent, seconds * 1000.0

    def _first_token(self, out, params: SamplingParams, start: float) -> node_pb2.FirstToken:
        msg = node_pb2.FirstToken(token_id=out.new_token_ids[0],
                                  finish_reason=convert.finish_reason_to_proto(out.finish_reason),
                                  cached_tokens=out.num_cached_tokens,
                                  prefill_ms=(time.monotonic() - start) * 1000.0)
        if out.new_logprobs:
            msg.logprob.CopyFrom(convert.logprob_to_proto(out.new_logprobs[0], params.logprobs or 0))
        if isinstance(out.stop_reason, str):
            msg.stop_sequence = out.stop_reason
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
        for sender in {id(s): s for s in self.senders.values()}.values():
            await sender.close()
