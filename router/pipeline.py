"""One completion's path through the pool: Reserve on a decode node -> Prefill (first token,
relayed at once) -> Decode stream (relayed token by token).

A `Pipeline` yields `Chunk`s. It does its own incremental detokenization over the token ids it
relays, mirroring the engine's stop rules, so text deltas never split a character and stop
strings are never emitted. Retries: UNAVAILABLE from a prefill node before the first token ->
another prefill node, with a fresh reservation. Once a token reached the client, a node failure
ends the completion with UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from engine.detokenizer import IncrementalDetokenizer
from engine.kv_transfer.base import transport_name
from engine.rpc import convert
from engine.rpc.errors import RpcError, ResourceExhausted, Unavailable
from protos.pdserve.v1 import generation_pb2, node_pb2
from router.placement import blocks_needed, pick_decode, pick_prefill
from router.prompts import Prompt
from router.registry import Node, NodeRegistry

logger = logging.getLogger("pdserve.router")
FR = generation_pb2.FinishReason
ABORT_TIMEOUT_S = 2.0
RESERVE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PipelineConfig:
    block_size: int = 16
    transport: int = node_pb2.KV_TRANSPORT_AUTO
    lease_ms: int = 10_000  # idle budget: renewed by the prefill node while queued/prefilling, and by every frame
    admission_wait_s: float = 2.0
    kv_wait_ms: int = 10_000


@dataclass
class Chunk:
    prompt_index: int
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob protos
    text: str = ""
    finish_reason: int = FR.FINISH_REASON_UNSPECIFIED
    stop_sequence: str = ""
    stop_token_id: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timings: generation_pb2.RequestTimings | None = None


def _forward_error(exc: grpc.aio.AioRpcError, what: str) -> RpcError:
    err = RpcError(f"{what}: {exc.details() or exc.code().name}")
    err.code = exc.code()
    return err


class Pipeline:
    def __init__(self, registry: NodeRegistry, config: PipelineConfig, tokenizer, prompt: Prompt,
                 prompt_index: int, index: int, node_request_id: str, priority: int, deadline: float,
                 arrival: float):
        self.registry, self.config = registry, config
        self.prompt, self.prompt_index, self.index = prompt, prompt_index, index
        self.node_request_id = node_request_id
        self.priority, self.deadline, self.arrival = priority, deadline, arrival
        self.params = prompt.params.clone()
        self.params.n = 1
        self.params.max_tokens = prompt.max_tokens
        self.wire_params = convert.params_to_proto(self.params, sample_index=index)
        self.detok = IncrementalDetokenizer(tokenizer, prompt.token_ids, self.params)
        self.holders: set[Node] = set()  # nodes that may hold state for this completion
        self._active: Node | None = None
        self.finished = False
        self.num_tokens = 0
        self.cached_tokens = 0
        self.timings = generation_pb2.RequestTimings()
        self._first_token_at = 0.0

    # ---- helpers ----------------------------------------------------------------------------
    def _remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def _ms_since_arrival(self) -> float:
        return (time.monotonic() - self.arrival) * 1000.0

    def _chunk(self, **kw) -> Chunk:
        return Chunk(self.prompt_index, self.index, prompt_tokens=len(self.prompt.token_ids),
                     completion_tokens=self.num_tokens, cached_tokens=self.cached_tokens, **kw)

    def _token(self, token_id: int, finish: int, stop_sequence: str = "", stop_token_id: int | None = None,
               logprob=None) -> Chunk:
        """Relays one token; mirrors the engine: a stop token id or eos that ends the output adds
        no text (unless include_stop_str for stop ids)."""
        self.num_tokens += 1
        self._time_token()
        ends_by_id = finish == FR.FINISH_REASON_EOS or (finish == FR.FINISH_REASON_STOP and not stop_sequence)
        if not ends_by_id or (finish == FR.FINISH_REASON_STOP and self.params.include_stop_str_in_output):
            matched = self.detok.append(token_id)
            if matched is not None and not finish:
                finish, stop_sequence = FR.FINISH_REASON_STOP, matched  # the node will agree
        if finish == FR.FINISH_REASON_STOP and not stop_sequence and stop_token_id is None:
            stop_token_id = token_id
        chunk = self._chunk(token_ids=[token_id], logprobs=[logprob] if logprob is not None else [],
                            text=self.detok.get_delta(finished=bool(finish)), finish_reason=finish,
                            stop_sequence=stop_sequence, stop_token_id=stop_token_id)
        if finish:
            self._finish(chunk)
        return chunk

    def _time_token(self) -> None:
        """Timings: the gap between the first and the second token relayed."""
        now = time.monotonic()
        if self.num_tokens == 1:
            self._first_token_at = now
        elif self.num_tokens == 2:
            self.timings.first_to_second_token_ms = (now - self._first_token_at) * 1000.0

    def _finish(self, chunk: Chunk) -> None:
        self.finished = True
        self.timings.e2e_ms = self._ms_since_arrival()
        chunk.timings = self.timings

    def final_chunk(self, finish: int) -> Chunk:
        """The last chunk when the completion ends early (abort, time limit)."""
        chunk = self._chunk(text=self.detok.get_delta(finished=True), finish_reason=finish)
        self._finish(chunk)
        return chunk

    # ---- the three steps ---------------------------------------------------------------------
    async def _reserve(self, exclude: set[str]) -> tuple[Node, node_pb2.ReserveResponse]:
        prompt_len = len(self.prompt.token_ids)
        need = blocks_needed(prompt_len + self.prompt.max_tokens, self.config.block_size)
        give_up = min(time.monotonic() + self.config.admission_wait_s, self.deadline)
        tried: set[str] = set(exclude)
        while True:
            node = pick_decode(self.registry.healthy("decode"), need, tried)
            if node is not None:
                self.holders.add(node)
                request = node_pb2.ReserveRequest(
                    request_id=self.node_request_id, num_prompt_tokens=prompt_len, lease_ms=self.config.lease_ms,
                    transport=self.config.transport, num_output_tokens=self.prompt.max_tokens)
                try:
                    reply = await node.stub.Reserve(request, timeout=min(self._remaining(), RESERVE_TIMEOUT_S))
                    node.pending_blocks += need
                    return node, reply
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        node.mark_down(f"Reserve: {exc.details()}")
                    elif exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise _forward_error(exc, f"decode node {node.node_id}") from None
                    tried.add(node.node_id)
                    continue
            if time.monotonic() >= give_up:
                if not self.registry.healthy("decode"):
                    raise Unavailable("no decode node is available")
                raise ResourceExhausted(
                    f"no decode node can admit {prompt_len} prompt + {self.prompt.max_tokens} new tokens "
                    f"({need} KV blocks) now; retry later")
            tried = set(exclude)
            try:
                await asyncio.wait_for(self.registry.changed.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass

    async def _prefill(self) -> tuple[Node, node_pb2.ReserveResponse, Node, grpc.aio.UnaryStreamCall,
                                      node_pb2.FirstToken]:
        tried: set[str] = set()
        while True:
            decode, reservation = await self._reserve(set())
            prefill = pick_prefill(self.registry.healthy("prefill"), tried)
            if prefill is None:
                await self._abort(decode)
                raise Unavailable("no prefill node is available")
            self.holders.add(prefill)
            target = node_pb2.KVTarget(
                decode_address=decode.address, reservation_id=reservation.reservation_id,
                transport=self.config.transport, rendezvous=reservation.rendezvous,
                decode_node_id=reservation.node_id or decode.node_id, layout=reservation.layout)
            request = node_pb2.PrefillRequest(request_id=self.node_request_id, prompt_token_ids=self.prompt.token_ids,
                                              params=self.wire_params, priority=self.priority, target=target)
            self.timings.queue_ms = self._ms_since_arrival()
            prefill.pending_prompt_tokens += len(self.prompt.token_ids)
            call = prefill.stub.Prefill(request, timeout=self._remaining())
            try:
                event = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    await self._abort(decode)
                    raise _forward_error(exc, f"prefill node {prefill.node_id}") from None
                event = None
            if event is None or event is grpc.aio.EOF or not event.HasField("first_token"):
                call.cancel()
                prefill.mark_down("Prefill failed before the first token")
                tried.add(prefill.node_id)
                await self._abort(decode)
                self.holders.discard(decode)
                logger.info("request %s: retrying on another prefill node", self.node_request_id)
                continue
            return decode, reservation, prefill, call, event.first_token

    def _event_chunks(self, event: node_pb2.DecodeEvent):
        """The chunks of one DecodeEvent, a token each; the event's finish belongs to its last token."""
        for j, token_id in enumerate(event.token_ids):
            last = j == len(event.token_ids) - 1
            yield self._token(token_id, event.finish_reason if last else FR.FINISH_REASON_UNSPECIFIED,
                              event.stop_sequence if last else "",
                              event.stop_token_id if last and event.HasField("stop_token_id") else None,
                              logprob=event.logprobs[j] if j < len(event.logprobs) else None)

    @property
    def colocated(self) -> bool:
        """No prefill pool: decode nodes run their own prompts (the `both` configuration)."""
        return not self.registry.by_role("prefill")

    async def run(self):
        if self.colocated:
            async for chunk in self._run_local():
                yield chunk
            return
        async for chunk in self._run_disaggregated():
            yield chunk

    async def _run_local(self):
        """Colocated: one decode node prefills the prompt in its own batch and generates; no
        reservation, no KV transfer. UNAVAILABLE before the first token -> another decode node."""
        prompt_len = len(self.prompt.token_ids)
        need = blocks_needed(prompt_len + self.prompt.max_tokens, self.config.block_size)
        tried: set[str] = set()
        call = None
        try:
            while True:
                node = pick_decode(self.registry.healthy("decode"), need, tried) or \
                    pick_decode(self.registry.healthy("decode"), 0, tried)  # the node queues what does not fit yet
                if node is None:
                    raise Unavailable("no decode node is available")
                self.holders.add(node)
                self.timings.queue_ms = self._ms_since_arrival()
                self.timings.prefill_node = self.timings.decode_node = node.node_id
                node.pending_blocks += need
                node.active += 1
                self._active = node
                call = node.stub.Decode(node_pb2.DecodeRequest(
                    request_id=self.node_request_id, prompt_token_ids=self.prompt.token_ids, params=self.wire_params,
                    priority=self.priority, local_prefill=True), timeout=self._remaining())
                try:
                    async for event in call:
                        if self.num_tokens == 0:
                            self.timings.ttft_ms = self._ms_since_arrival()
                            self.cached_tokens = event.cached_tokens
                        for chunk in self._event_chunks(event):
                            yield chunk
                            if self.finished:
                                return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise _forward_error(exc, f"decode node {node.node_id}") from None
                    node.mark_down(f"Decode stream broke: {exc.code().name}")
                    if self.num_tokens:
                        raise Unavailable(f"decode node {node.node_id} failed mid-stream; "
                                          f"{self.num_tokens} tokens were sent") from None
                    node.active -= 1
                    self._active = None
                    tried.add(node.node_id)
                    continue
                raise Unavailable(f"decode node {node.node_id} ended the stream without finishing")
        finally:
            if call is not None:
                call.cancel()
            if self._active is not None:
                self._active.active -= 1
                self._active = None
            if not self.finished:
                await asyncio.gather(*(self._abort(n) for n in self.holders))

    async def _run_disaggregated(self):
        decode_call = transfer = prefill_call = None
        try:
            decode, reservation, prefill, prefill_call, first = await self._prefill()
            decode.active += 1
            self._active = decode
            self.timings.ttft_ms = self._ms_since_arrival()
            self.timings.prefill_ms = first.prefill_ms
            self.timings.prefill_node = prefill.node_id
            self.cached_tokens = first.cached_tokens
            first_chunk = self._token(first.token_id, first.finish_reason, first.stop_sequence,
                                      logprob=first.logprob if first.HasField("logprob") else None)
            if self.finished:
                prefill_call.cancel()
                await self._abort(decode)
                yield first_chunk
                return
            self.timings.decode_node = decode.node_id
            yield first_chunk
            decode_call = decode.stub.Decode(node_pb2.DecodeRequest(
                request_id=self.node_request_id, reservation_id=reservation.reservation_id,
                prompt_token_ids=self.prompt.token_ids, first_token_id=first.token_id, params=self.wire_params,
                priority=self.priority, kv_wait_ms=self.config.kv_wait_ms), timeout=self._remaining())
            transfer = asyncio.get_running_loop().create_task(self._watch_transfer(prefill, prefill_call, decode_call))
            try:
                async for event in decode_call:
                    for chunk in self._event_chunks(event):
                        if chunk.finish_reason:
                            await self._transfer_result(transfer)
                        yield chunk
                        if self.finished:
                            return
            except grpc.aio.AioRpcError as exc:
                failed = await self._transfer_result(transfer)
                if failed is not None:
                    raise failed from None
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    decode.mark_down(f"Decode stream broke: {exc.code().name}")
                    raise Unavailable(f"decode node {decode.node_id} failed mid-stream; "
                                      f"{self.num_tokens} tokens were sent") from None
                raise _forward_error(exc, f"decode node {decode.node_id}") from None
            raise Unavailable(f"decode node {decode.node_id} ended the stream without finishing")
        finally:
            for call in (decode_call, prefill_call):
                if call is not None:
                    call.cancel()
            if transfer is not None:
                transfer.cancel()
            if self._active is not None:
                self._active.active -= 1
            if not self.finished:
                await asyncio.gather(*(self._abort(n) for n in self.holders))

    async def _watch_transfer(self, prefill: Node, call, decode_call) -> RpcError | None:
        """Reads the prefill stream's TransferDone. A failure there fails the decode call too."""
        try:
            while (event := await call.read()) is not grpc.aio.EOF:  # read(): the first event was read() too
                if event.HasField("transfer_done"):
                    self.timings.kv_transfer_ms = event.transfer_done.ms
                    self.timings.kv_transfer_bytes = event.transfer_done.bytes
                    self.timings.kv_transport = transport_name(event.transfer_done.transport)
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self.finished:
                return None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                prefill.mark_down("Prefill stream broke during the KV transfer")
            decode_call.cancel()
            return Unavailable(f"prefill node {prefill.node_id} failed during the KV transfer "
                               f"({exc.code().name})")

    async def _transfer_result(self, transfer: asyncio.Task) -> RpcError | None:
        try:
            return await asyncio.wait_for(asyncio.shield(transfer), timeout=1.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            return None

    async def _abort(self, node: Node) -> None:
        try:
            await node.stub.Abort(node_pb2.NodeAbortRequest(request_id=self.node_request_id),
                                  timeout=ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                node.mark_down("Abort failed")
