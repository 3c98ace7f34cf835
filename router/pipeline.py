"""One completion's path through the pool: Reserve on a decode node -> Prefill (first token,
relayed at once) -> Decode stream (relayed token by token).

A `Pipeline` yields `Chunk`s. It relays what the nodes decided, where the tokens were sampled:
each event's text delta (never a split character, never a stop string unless
include_stop_str_in_output), its finish reason and the stop string or stop token id that ended it.
A node that takes over a completion (an imported first token, resumed output tokens) streams only
the text after what the client already has; the router only keeps the text the last node held
back, sent if the router ends the completion itself (time limit, cancel).

Every stage has its own budget (`PipelineConfig`): Reserve, prefill to the first token, the KV
transfer up to the first decode event, and each later gap between tokens; node channels also
notice a frozen peer by keepalive within seconds. Retries: a prefill node failing before the first
token -> another prefill node, with a fresh reservation. A failure after the first token but
before the second (the transfer broke, the reservation expired, the decode node died or stalled)
-> a fresh reservation and prefill, decoding on from the token the client already has. Any later
failure ends the completion with UNAVAILABLE within a stage budget. A failing call only makes the
router re-check that node (`NodeRegistry.suspect`): a node is marked down by its own health poll,
never because its peer failed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from engine.rpc import convert
from engine.rpc.errors import RpcError, ResourceExhausted, Unavailable
from protos.pdserve.v1 import generation_pb2, node_pb2
from router.placement import blocks_needed
from router.policy import Choice, Placement
from router.prompts import Prompt
from router.registry import Node, NodeRegistry

logger = logging.getLogger("pdserve.router")
FR = generation_pb2.FinishReason
ABORT_TIMEOUT_S = 2.0
HEALTH_RECHECK_S = 0.5  # a wait on a node call looks at the node's health this often
# A decode stream that ends with one of these moves to another decode node (a dead, stalled or
# shut-down node); anything else (bad input, out of blocks) goes back to the client.
FAILOVER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class PipelineConfig:
    block_size: int = 16
    transport: int = node_pb2.KV_TRANSPORT_AUTO
    lease_ms: int = 10_000  # idle budget: renewed by the prefill node while queued/prefilling, and by every frame
    admission_wait_s: float = 2.0
    kv_wait_ms: int = 10_000
    reserve_timeout_s: float = 5.0  # one Reserve call
    prefill_timeout_s: float = 60.0  # to the first token: queueing plus this ...
    # ... plus this per prompt token: sized for a CPU node (the default model prefills long prompts
    # at tens of tokens/s there); a frozen node is caught sooner by its health polls
    # (`_wait_while_healthy`), so this only bounds a node that answers polls but never finishes
    prefill_s_per_token: float = 0.1
    token_gap_s: float = 30.0  # longest wait for the next decode event (after the first one)
    max_retries: int = 2  # fresh attempts of one completion before its second token
    max_failovers: int = 2  # moves of one completion to another decode node once tokens were sent
    placement: Placement | None = None  # policies + local-prefill threshold (None: defaults per pipeline)


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
    prompt_logprobs: list = field(default_factory=list)  # TokenLogprob protos (first token's chunk only)
    prompt_token_ids: list[int] = field(default_factory=list)  # set with prompt_logprobs


def _forward_error(exc: grpc.aio.AioRpcError, what: str) -> RpcError:
    """A node's error, passed on to the client. CANCELLED from a node is the node's doing (it was
    aborted or is shutting down), never the client's: it becomes UNAVAILABLE."""
    err = RpcError(f"{what}: {exc.details() or exc.code().name}")
    err.code = grpc.StatusCode.UNAVAILABLE if exc.code() == grpc.StatusCode.CANCELLED else exc.code()
    return err


class Pipeline:
    def __init__(self, registry: NodeRegistry, config: PipelineConfig, prompt: Prompt, prompt_index: int,
                 index: int, node_request_id: str, priority: int, deadline: float, arrival: float):
        self.registry, self.config = registry, config
        self.prompt, self.prompt_index, self.index = prompt, prompt_index, index
        self.node_request_id = node_request_id
        self.priority, self.deadline, self.arrival = priority, deadline, arrival
        self.params = prompt.params.clone()
        self.params.n = 1
        self.params.max_tokens = prompt.max_tokens
        if index != 0:  # prompt logprobs are the same for every completion: index 0 computes them
            self.params.prompt_logprobs = None
        self.wire_params = convert.params_to_proto(self.params, sample_index=index)
        self.holders: set[Node] = set()  # nodes that may hold state for this completion
        self.placement = config.placement or Placement(config.block_size)
        self.hashes = prompt.block_hashes(config.block_size)  # for prefix-aware placement
        self.output_ids: list[int] = []  # every token relayed so far (resumed on a failover)
        self.held_text = ""  # text the last node holds back after the tokens relayed so far
        self._background: set[asyncio.Task] = set()
        self._active: Node | None = None
        self.finished = False
        self.num_tokens = 0
        self.first_token_id = 0
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

    def _relay(self, token_ids, logprobs, event) -> list[Chunk]:
        """The chunks of one node event (`FirstToken` or `DecodeEvent`), a token each, as the node
        decided them: the event's text, finish and stop belong to its last token."""
        self.held_text = event.held_text
        chunks = []
        for j, token_id in enumerate(token_ids):
            self.num_tokens += 1
            self.output_ids.append(token_id)
            self._time_token()
            chunks.append(self._chunk(token_ids=[token_id], logprobs=[logprobs[j]] if j < len(logprobs) else []))
        if chunks:
            last = chunks[-1]
            last.text, last.finish_reason, last.stop_sequence = event.text, event.finish_reason, event.stop_sequence
            last.stop_token_id = event.stop_token_id if event.HasField("stop_token_id") else None
            if last.finish_reason:
                self._finish(last)
        return chunks

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

    def _with_prompt_logprobs(self, chunk: Chunk, entries) -> Chunk:
        """Attaches the prompt logprobs a node returned with the first token."""
        if self.params.prompt_logprobs is not None:
            chunk.prompt_logprobs = list(entries)
            chunk.prompt_token_ids = list(self.prompt.token_ids)
        return chunk

    def final_chunk(self, finish: int) -> Chunk:
        """The last chunk when the completion ends early (abort, time limit)."""
        chunk = self._chunk(text=self.held_text, finish_reason=finish)
        self.held_text = ""
        self._finish(chunk)
        return chunk

    # ---- the three steps ---------------------------------------------------------------------
    async def _reserve(self, exclude: set[str]) -> tuple[Node, node_pb2.ReserveResponse]:
        prompt_len = len(self.prompt.token_ids)
        need = blocks_needed(prompt_len + self.prompt.max_tokens, self.config.block_size)
        give_up = min(time.monotonic() + self.config.admission_wait_s, self.deadline)
        tried: set[str] = set(exclude)
        while True:
            choice = self.placement.decode.pick(self.registry.healthy("decode"), self.hashes, prompt_len, tried, need)
            node = choice.node if choice is not None else None
            if node is not None:
                self.holders.add(node)
                request = node_pb2.ReserveRequest(
                    request_id=self.node_request_id, num_prompt_tokens=prompt_len, lease_ms=self.config.lease_ms,
                    transport=self.config.transport, num_output_tokens=self.prompt.max_tokens)
                try:
                    reply = await node.stub.Reserve(request, timeout=min(self._remaining(),
                                                                         self.config.reserve_timeout_s))
                    node.pending_blocks += need
                    return node, reply
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED):
                        self.registry.suspect(node)
                        await self._abort(node)  # a late Reserve may still have landed
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

    async def _wait_while_healthy(self, futures: set, node: Node, budget: float) -> set:
        """Waits up to `budget` seconds for the first of `futures`, giving up early once the registry
        marks `node` down (a frozen node: its polls time out); returns the done ones."""
        end = time.monotonic() + min(budget, self._remaining())
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return set()
            done, _ = await asyncio.wait(futures, timeout=min(left, HEALTH_RECHECK_S),
                                         return_when=asyncio.FIRST_COMPLETED)
            if done or not node.healthy:
                return done

    def _prefill_budget(self) -> float:
        budget = self.config.prefill_timeout_s + self.config.prefill_s_per_token * len(self.prompt.token_ids)
        return min(budget, self._remaining())

    async def _prefill(self) -> "_Attempt":
        """A reservation and a prefill node that returned the first token (retried on other prefill
        nodes while none did)."""
        tried: set[str] = set()
        while True:
            if not any(n.node_id not in tried for n in self.registry.healthy("prefill")):
                raise Unavailable("no prefill node is available")  # before reserving blocks for nothing
            decode, reservation = await self._reserve(set())
            choice = self.placement.prefill.pick(self.registry.healthy("prefill"), self.hashes,
                                                 len(self.prompt.token_ids), tried)
            prefill = choice.node if choice is not None else None
            if prefill is None:  # the last one went down while the reservation was made
                await self._abort(decode)
                self.holders.discard(decode)  # aborted once, not again with the holders
                raise Unavailable("no prefill node is available")
            self.holders.add(prefill)
            target = node_pb2.KVTarget(
                decode_address=decode.address, reservation_id=reservation.reservation_id,
                transport=self.config.transport, rendezvous=reservation.rendezvous,
                decode_node_id=reservation.node_id or decode.node_id, layout=reservation.layout,
                kv_lanes=reservation.kv_lanes)
            request = node_pb2.PrefillRequest(request_id=self.node_request_id, prompt_token_ids=self.prompt.token_ids,
                                              params=self.wire_params, priority=self.priority, target=target)
            self.timings.queue_ms = self._ms_since_arrival()
            self.placement.stats.placed(choice)
            prefill.pending_prompt_tokens += len(self.prompt.token_ids) - choice.cached_tokens
            call = prefill.stub.Prefill(request, timeout=self._remaining())
            read = asyncio.ensure_future(call.read())
            read.add_done_callback(_retrieve)
            try:
                if not await self._wait_while_healthy({read}, prefill, self._prefill_budget()):
                    read.cancel()
                    logger.warning("request %s: no first token from %s (%s)", self.node_request_id, prefill.node_id,
                                   "over its budget" if prefill.healthy else "the node stopped answering")
                event = read.result() if read.done() and not read.cancelled() else None
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    await self._abort(decode)
                    raise _forward_error(exc, f"prefill node {prefill.node_id}") from None
                event = None
            if event is None or event is grpc.aio.EOF or not event.HasField("first_token"):
                call.cancel()
                self.registry.suspect(prefill)
                tried.add(prefill.node_id)
                await asyncio.gather(self._abort(decode), self._abort(prefill))
                self.holders.discard(decode)
                logger.info("request %s: retrying on another prefill node", self.node_request_id)
                continue
            return _Attempt(decode, reservation, prefill, call, event.first_token)

    def _event_chunks(self, event: node_pb2.DecodeEvent) -> list[Chunk]:
        return self._relay(event.token_ids, event.logprobs, event)

    @property
    def colocated(self) -> bool:
        """No prefill pool: decode nodes run their own prompts (the `both` configuration)."""
        return not self.registry.by_role("prefill")

    async def run(self):
        if self.colocated:
            chunks = self._run_local()
        else:  # prompt logprobs need the whole prompt computed: the prefill pool does that
            choice = self._decode_first() if self.params.prompt_logprobs is None else None
            chunks = self._run_local(first=choice) if choice is not None else self._run_disaggregated()
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # aclose() / an early exit runs the inner generator's cleanup (aborts, holders) now
            await chunks.aclose()

    def _decode_first(self) -> Choice | None:
        """Decode node first, then decide: it prefills the prompt itself when the part it has not
        cached is short (`Placement.local_prefill_tokens`); None = use the prefill pool."""
        prompt_len = len(self.prompt.token_ids)
        need = blocks_needed(prompt_len + self.prompt.max_tokens, self.config.block_size)
        choice = self.placement.decode.pick(self.registry.healthy("decode"), self.hashes, prompt_len, set(), need)
        if not self.placement.prefill_locally(choice, prompt_len):
            return None
        self.placement.stats.prefills_skipped += 1
        self.placement.stats.placed(choice)
        return choice

    def spawn_abort(self, node: Node) -> None:
        """Frees what a failed node may still hold, without waiting for it."""
        task = asyncio.get_running_loop().create_task(self._abort(node))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_local(self, first: Choice | None = None, exclude: frozenset[str] = frozenset(),
                         failovers: int = 0):
        """A decode node runs the prompt itself, in its own batch (no reservation, no KV transfer):
        colocated serving, a prompt whose uncached part is short on `first`'s node, or a failover,
        where the tokens the client already has are resumed (the node recomputes their KV and goes
        on from them, same seeded stream). A decode node failing or stalling moves the completion
        to another one, at most `max_failovers` times once tokens were sent."""
        prompt_len = len(self.prompt.token_ids)
        need = blocks_needed(prompt_len + self.prompt.max_tokens, self.config.block_size)
        tried: set[str] = set(exclude)
        call = None
        try:
            while True:
                choice = first or self.placement.decode.pick(
                    self.registry.healthy("decode"), self.hashes, prompt_len, tried, need) or \
                    self.placement.decode.pick(self.registry.healthy("decode"), self.hashes, prompt_len, tried)
                first = None  # the node queues what does not fit yet
                if choice is None:
                    raise Unavailable("no decode node is available" if not self.num_tokens else
                                      f"no decode node could take over; {self.num_tokens} tokens were sent")
                node = choice.node
                self.holders.add(node)
                if not self.num_tokens:
                    self.timings.queue_ms = self._ms_since_arrival()
                    self.timings.prefill_node = node.node_id
                self.timings.decode_node = node.node_id
                node.pending_blocks += need
                node.active += 1
                self._active = node
                call = node.stub.Decode(node_pb2.DecodeRequest(
                    request_id=self.node_request_id, prompt_token_ids=self.prompt.token_ids, params=self.wire_params,
                    priority=self.priority, local_prefill=True, output_token_ids=self.output_ids),
                    timeout=self._remaining())
                try:
                    async for chunk in self._relay_local(call):
                        yield chunk
                        if self.finished:
                            return
                    raise Unavailable(f"decode node {node.node_id} ended the stream without finishing")
                except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
                    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.DEADLINE_EXCEEDED
                    if code not in FAILOVER_CODES or (self.num_tokens and failovers >= self.config.max_failovers):
                        if code in FAILOVER_CODES:
                            raise Unavailable(f"decode node {node.node_id} failed mid-stream; {self.num_tokens} "
                                              f"tokens were sent") from None
                        raise _forward_error(exc, f"decode node {node.node_id}") from None
                    call.cancel()
                    self.registry.suspect(node)
                    self.spawn_abort(node)
                    self.holders.discard(node)
                    node.active -= 1
                    self._active = None
                    tried.add(node.node_id)
                    if self.num_tokens:
                        failovers += 1
                        self.placement.stats.failovers += 1
                        logger.info("request %s: decode node %s failed after %d tokens (%s); resuming elsewhere",
                                    self.node_request_id, node.node_id, self.num_tokens, code.name)
        finally:
            if call is not None:
                call.cancel()
            if self._active is not None:
                self._active.active -= 1
                self._active = None
            if not self.finished:
                await asyncio.gather(*(self._abort(n) for n in self.holders))

    async def _relay_local(self, call):
        """The chunks of a local-prefill Decode stream; a gap longer than its stage budget raises
        TimeoutError (the first event's budget covers the prompt's prefill)."""
        budget = self._prefill_budget() if not self.num_tokens else self.config.token_gap_s
        while True:
            event = await asyncio.wait_for(call.read(), timeout=min(budget, self._remaining()))
            if event is grpc.aio.EOF:
                return
            budget = self.config.token_gap_s
            first = self.num_tokens == 0
            if first:
                self.timings.ttft_ms = self._ms_since_arrival()
                self.cached_tokens = event.cached_tokens
            for chunk in self._event_chunks(event):
                if first:
                    first = False
                    self._with_prompt_logprobs(chunk, event.prompt_logprobs)
                yield chunk

    async def _run_disaggregated(self):
        attempt = None
        try:
            attempt = await self._prefill()
            first = attempt.first_token
            self.first_token_id = first.token_id
            self.timings.ttft_ms = self._ms_since_arrival()
            self.timings.prefill_ms = first.prefill_ms
            self.cached_tokens = first.cached_tokens
            first_chunk = self._with_prompt_logprobs(
                self._relay([first.token_id], [first.logprob] if first.HasField("logprob") else [], first)[0],
                first.prompt_logprobs)
            if self.finished:  # the first token ended it: the prefill node freed its KV, free the reservation
                attempt.close()
                await self._abort(attempt.decode)
                yield first_chunk
                return
            yield first_chunk
            retries = 0
            while True:
                try:
                    async for chunk in self._decode(attempt):
                        yield chunk
                        if self.finished:
                            return
                    raise _Retry(f"decode node {attempt.decode.node_id} ended the stream without finishing")
                except _Retry as why:
                    if self.num_tokens > 1 and self.config.max_failovers > 0:  # mid-stream: resume elsewhere
                        failed = attempt.decode.node_id
                        await self._end_attempt(attempt)
                        attempt = None
                        self.placement.stats.failovers += 1
                        logger.info("request %s: %s after %d tokens; resuming on another decode node",
                                    self.node_request_id, why, self.num_tokens)
                        async for chunk in self._run_local(exclude=frozenset({failed}), failovers=1):
                            yield chunk
                        return
                    if self.num_tokens > 1 or retries >= self.config.max_retries:
                        raise Unavailable(f"{why}; {self.num_tokens} tokens were sent") from None
                    retries += 1
                    logger.info("request %s: %s; retrying with a fresh reservation", self.node_request_id, why)
                    await self._end_attempt(attempt)
                    attempt = None
                    attempt = await self._prefill()
        finally:
            if attempt is not None:
                attempt.close()
            if not self.finished:
                await asyncio.gather(*(self._abort(n) for n in self.holders))

    async def _end_attempt(self, attempt: "_Attempt") -> None:
        attempt.close()
        await asyncio.gather(self._abort(attempt.decode), self._abort(attempt.prefill))
        self.holders.clear()

    async def _decode(self, attempt: "_Attempt"):
        """The tokens after the first, from the attempt's decode node; raises _Retry for failures that
        a fresh attempt may fix (only acted on before the second token)."""
        decode, prefill = attempt.decode, attempt.prefill
        attempt.decode_call = decode.stub.Decode(node_pb2.DecodeRequest(
            request_id=self.node_request_id, reservation_id=attempt.reservation.reservation_id,
            prompt_token_ids=self.prompt.token_ids, first_token_id=self.first_token_id, params=self.wire_params,
            priority=self.priority, kv_wait_ms=self.config.kv_wait_ms), timeout=self._remaining())
        attempt.transfer = asyncio.get_running_loop().create_task(self._watch_transfer(attempt))
        decode.active += 1
        self._active = decode
        self.timings.decode_node = decode.node_id
        self.timings.prefill_node = prefill.node_id
        budget = self.config.kv_wait_ms / 1000.0 + self.config.token_gap_s  # transfer + import + a step
        try:
            while True:
                event = await self._next_event(attempt, budget)
                if event is grpc.aio.EOF:
                    return
                budget = self.config.token_gap_s
                for chunk in self._event_chunks(event):
                    if chunk.finish_reason:
                        await self._transfer_result(attempt.transfer)
                    yield chunk
                    if self.finished:
                        return
        finally:
            decode.active -= 1
            self._active = None

    async def _next_event(self, attempt: "_Attempt", budget: float):
        """The next DecodeEvent (or EOF) within `budget` seconds, watching the KV transfer meanwhile."""
        decode = attempt.decode
        if attempt.read is None:  # a read is never cancelled while the call lives: that cancels the call
            attempt.read = asyncio.ensure_future(attempt.decode_call.read())
            attempt.read.add_done_callback(_retrieve)
        read = attempt.read
        while True:
            watch = {read} if attempt.transfer.done() else {read, attempt.transfer}
            done = await self._wait_while_healthy(watch, decode, budget)
            if read in done:
                break
            if attempt.transfer in done:
                failed = attempt.transfer.result()
                if failed is not None:
                    raise _Retry(failed)
                continue  # the KV arrived: `budget` again for the token
            if not attempt.transfer.done() and decode.healthy and attempt.prefill.healthy and self._remaining() > 0:
                # The KV is still moving: however long a large transfer takes, both ends bound it
                # (the prefill node's per-frame budgets, the decode node's KV wait renewed by
                # progress) and end their calls when it stalls, so the router waits on it.
                continue
            self.registry.suspect(decode)
            if not decode.healthy:
                raise _Retry(f"decode node {decode.node_id} stopped answering")
            raise _Retry(f"decode node {decode.node_id} sent nothing for {budget:.0f} s")
        attempt.read = None
        try:
            return read.result()
        except grpc.aio.AioRpcError as exc:
            failed = await self._transfer_result(attempt.transfer)
            if failed is not None:
                raise _Retry(failed) from None
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.registry.suspect(decode)
                raise _Retry(f"decode node {decode.node_id} failed ({code.name})") from None
            if code == grpc.StatusCode.NOT_FOUND:  # the reservation expired before the KV or Decode came
                raise _Retry(f"decode node {decode.node_id}: {exc.details()}") from None
            raise _forward_error(exc, f"decode node {decode.node_id}") from None

    async def _watch_transfer(self, attempt: "_Attempt") -> str | None:
        """Reads the prefill stream's TransferDone; returns what went wrong, or None."""
        prefill = attempt.prefill
        try:
            while (event := await attempt.prefill_call.read()) is not grpc.aio.EOF:
                if event.HasField("transfer_done"):
                    self.timings.kv_transfer_ms = event.transfer_done.ms
                    self.timings.kv_transfer_bytes = event.transfer_done.bytes
                    self.timings.kv_transport = convert.transport_name(event.transfer_done.transport)
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self.finished:
                return None
            self.registry.suspect(prefill)
            self.registry.suspect(attempt.decode)
            return f"the KV transfer from prefill node {prefill.node_id} failed ({exc.code().name})"

    async def _transfer_result(self, transfer: asyncio.Task | None) -> str | None:
        if transfer is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(transfer), timeout=1.0)
        except asyncio.TimeoutError:
            return None

    async def _abort(self, node: Node) -> None:
        try:
            await node.stub.Abort(node_pb2.NodeAbortRequest(request_id=self.node_request_id),
                                  timeout=ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.registry.suspect(node)


class _Retry(Exception):
    """A failure before the second token that a fresh reservation and prefill may fix."""


@dataclass(eq=False)
class _Attempt:
    """One try at a completion: the decode node's reservation and the prefill call that produced
    the first token and moves the KV."""

    decode: Node
    reservation: node_pb2.ReserveResponse
    prefill: Node
    prefill_call: grpc.aio.UnaryStreamCall
    first_token: node_pb2.FirstToken | None = None
    decode_call: grpc.aio.UnaryStreamCall | None = None
    transfer: asyncio.Task | None = None
    read: asyncio.Future | None = None  # the pending read of decode_call

    def close(self) -> None:
        for call in (self.decode_call, self.prefill_call):
            if call is not None:
                call.cancel()
        for task in (self.transfer, self.read):
            if task is not None:
                task.cancel()


def _retrieve(task: asyncio.Future) -> None:
    """Marks an abandoned read's outcome as seen (no 'exception was never retrieved' at exit)."""
    if not task.cancelled():
        task.exception()
