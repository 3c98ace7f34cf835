"""Thin servicers: pdserve.v1.Generation (public) and pdserve.v1.RouterControl (nodes)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import time
from dataclasses import dataclass, replace

import grpc

from engine.metrics import COUNTED_BY_KEY
from engine.rpc import convert
from engine.rpc.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc, node_pb2, router_pb2, router_pb2_grpc
from router.auth import ADMIN, Scopes
from router.ledger import Ledger, RequestRun
from router.pipeline import Chunk, Pipeline, PipelineConfig
from router.placement import blocks_needed
from router.prompts import ModelLimits, Prompt, PromptBuilder
from router.registry import HEARTBEAT_INTERVAL_MS, NodeRegistry, PoolConfig

FR = generation_pb2.FinishReason
NO_DEADLINE_S = 3600.0
DEADLINE_MARGIN_S = 0.05  # end with TIME_LIMIT this long before the gRPC deadline, so the last chunk gets out


def _version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass(frozen=True)
class RouterLimits:
    """Bounds on what one request may hold in the router and the pool."""

    max_stream_buffer: int = 1024  # chunks buffered for a reader that does not keep up; past it: aborted
    max_request_block_share: float = 0.5  # of all decode KV blocks (always enough for one full context)


@dataclass(frozen=True)
class ModelCard:
    """What ModelInfo reports. block_size, dtype and max_model_len are the router's flags (or its
    model's) until a node registers, then the pool's (`Router.adopt`)."""

    name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    eos_token_ids: list[int]
    dtype: str  # "auto": not known before a node registered


class Router:
    """Request execution shared by Generate and GenerateStream."""

    def __init__(self, registry: NodeRegistry, builder: PromptBuilder, card: ModelCard, config: PipelineConfig,
                 limits: RouterLimits = RouterLimits(), check_spec=None, check_threads: int = 1):
        self.registry, self.builder, self.card, self.config, self.limits = registry, builder, card, config, limits
        self.ledger = Ledger()
        registry.on_pool = self.adopt
        if registry.pool is not None:
            self.adopt(registry.pool)
        self.metrics = None  # engine.metrics.Metrics when --metrics-port is set
        # One tokenizer thread: the event loop never tokenizes, and a fast tokenizer is not safe to
        # reconfigure from two threads at once.
        self.tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        # Output constraints parse apart from it (`check_spec`, e.g. a GrammarCheckerPool's check: a
        # schema may take seconds), so a slow one never holds up other requests' tokenization.
        self.check_spec = check_spec
        self.check_threads = concurrent.futures.ThreadPoolExecutor(check_threads, thread_name_prefix="grammar-check")

    async def off_loop(self, fn, *args):
        """Runs tokenizer work on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn, *args)

    def check_blocks(self, prompts: list[Prompt]) -> None:
        """One request may reserve at most a share of the decode pool's KV blocks (always at least one
        full context's worth)."""
        pool = sum(n.load.total_blocks for n in self.registry.by_role("decode"))
        if not pool:
            return
        bs = self.config.block_size
        need = sum(blocks_needed(len(p.token_ids) + p.max_tokens, bs) * p.params.n for p in prompts)
        cap = max(int(pool * self.limits.max_request_block_share), blocks_needed(self.card.max_model_len, bs))
        if need > cap:
            raise InvalidArgument(f"this request needs {need} KV blocks (prompts x n x (prompt + max_tokens)); "
                                  f"one request may hold at most {cap}; send fewer completions or fewer tokens")

    def adopt(self, pool: PoolConfig) -> None:
        """The registered nodes' block size, dtype and max_model_len replace the router's own:
        ModelInfo reports them, prompts are checked against them, placement hashes by them."""
        card = self.card
        self.card = replace(card, block_size=pool.block_size or card.block_size, dtype=pool.dtype or card.dtype,
                            max_model_len=pool.max_model_len or card.max_model_len)
        if self.card.max_model_len != card.max_model_len:
            self.builder.set_limits(ModelLimits(card.vocab_size, self.card.max_model_len))
        if self.card.block_size != self.config.block_size:
            self.config = replace(self.config, block_size=self.card.block_size)
            if self.config.placement is not None:
                self.config.placement.set_block_size(self.card.block_size)

    def shutdown(self) -> int:
        """Ends every request still running with UNAVAILABLE (after the shutdown grace period)."""
        runs = self.ledger.runs()
        for run in runs:
            run.fail(Unavailable("the router is shutting down; retry on another router"))
        return len(runs)

    def check_model(self, name: str) -> None:
        if name and name != self.card.name:
            raise NotFound(f"model {name[:200]!r} is not served here (this server serves {self.card.name!r})")

    async def execute(self, request: generation_pb2.GenerateRequest, time_remaining: float | None,
                      scope: str = "", counted_elsewhere: bool = False):
        """Yields (run, chunk) for every chunk of every completion of the request.
        `counted_elsewhere`: the gateway counts this request in its metrics (the router does not)."""
        arrival = time.monotonic()
        self.check_model(request.model)
        prompts = await self.off_loop(self.builder.build, request)
        spec = prompts[0].params.structured  # one request: one parameter set for all its prompts
        if spec is not None and self.check_spec is not None:
            await asyncio.get_running_loop().run_in_executor(self.check_threads, self.check_spec, spec)
        self.check_blocks(prompts)
        limits = [NO_DEADLINE_S]
        if request.HasField("timeout_ms"):
            if request.timeout_ms == 0:
                raise InvalidArgument("timeout_ms must be > 0")
            limits.append(request.timeout_ms / 1000.0)
        if time_remaining is not None:
            limits.append(max(time_remaining - min(DEADLINE_MARGIN_S, 0.1 * time_remaining), 0.001))
        deadline = arrival + min(limits)
        run = self.ledger.open(request.client_request_id, scope)
        queue: asyncio.Queue = asyncio.Queue()
        run.wakeup = lambda: queue.put_nowait(run.failure)
        loop = asyncio.get_running_loop()
        pipelines = [Pipeline(self.registry, self.config, prompt, p, i,
                              f"{run.request_id}.{p}.{i}", request.priority, deadline, arrival)
                     for p, prompt in enumerate(prompts) for i in range(prompt.params.n)]
        reader = asyncio.current_task()
        run.tasks = [loop.create_task(self._feed(run, pipe, queue, reader)) for pipe in pipelines]
        timer = loop.call_at(deadline, run.end, FR.FINISH_REASON_TIME_LIMIT)
        tracker = self.metrics.track(arrival) if self.metrics is not None and not counted_elsewhere else None
        pending = len(pipelines)
        try:
            while pending:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason:
                    pending -= 1
                if tracker is not None:
                    tracker.chunk(item)
                yield run, item
        finally:
            if tracker is not None:
                tracker.close(aborted=pending > 0)
            timer.cancel()
            for task in run.tasks:
                task.cancel()
            await asyncio.gather(*run.tasks, return_exceptions=True)
            self.ledger.close(run)

    async def _feed(self, run: RequestRun, pipe: Pipeline, queue: asyncio.Queue, reader: asyncio.Task) -> None:
        """Moves one pipeline's chunks to the request's queue; always ends with a last chunk or an
        error there, so the request's reader never waits forever."""
        try:
            async for chunk in pipe.run():
                queue.put_nowait(chunk)
                if queue.qsize() > self.limits.max_stream_buffer:
                    self._too_slow(run, reader)
            if not pipe.finished:
                queue.put_nowait(Unavailable("a completion ended without a final token"))
        except asyncio.CancelledError:
            if run.end_reason and not pipe.finished:
                queue.put_nowait(pipe.final_chunk(run.end_reason))
            elif not run.failure and not asyncio.current_task().cancelling():
                # a CancelledError nobody asked for (a cancelled node call): an error, not a hang
                queue.put_nowait(Unavailable("a node call was cancelled"))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the request's handler, which raises it
            queue.put_nowait(exc)

    def _too_slow(self, run: RequestRun, reader: asyncio.Task) -> None:
        """The client reads too slowly: end the request everywhere and free what it holds."""
        limit = self.limits.max_stream_buffer
        run.fail(ResourceExhausted(f"the client fell more than {limit} chunks behind the stream; aborted"))
        reader.cancel()  # it may be stuck writing to a client that does not read


def _counted_elsewhere(context) -> bool:
    return any(key == COUNTED_BY_KEY for key, _ in context.invocation_metadata() or ())


def _stream_response(run: RequestRun, chunk: Chunk) -> generation_pb2.GenerateStreamResponse:
    msg = generation_pb2.GenerateStreamResponse(
        request_id=run.request_id, client_request_id=run.client_request_id, index=chunk.index, text=chunk.text,
        token_ids=chunk.token_ids, logprobs=chunk.logprobs, finish_reason=chunk.finish_reason,
        stop_sequence=chunk.stop_sequence, prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens, cached_tokens=chunk.cached_tokens,
        prompt_logprobs=chunk.prompt_logprobs, prompt_token_ids=chunk.prompt_token_ids)
    if chunk.stop_token_id is not None:
        msg.stop_token_id = chunk.stop_token_id
    if chunk.timings is not None:
        msg.timings.CopyFrom(chunk.timings)
    return msg


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, router: Router, scopes: Scopes = Scopes([])):
        self.router, self.scopes = router, scopes

    async def Generate(self, request, context):
        completions: dict[tuple[int, int], generation_pb2.Completion] = {}
        run = None
        async for run, chunk in self.router.execute(request, context.time_remaining(), self.scopes.caller(context),
                                                    _counted_elsewhere(context)):
            key = (chunk.prompt_index, chunk.index)
            c = completions.get(key)
            if c is None:
                c = completions[key] = generation_pb2.Completion(prompt_index=chunk.prompt_index, index=chunk.index)
            c.text += chunk.text
            c.token_ids.extend(chunk.token_ids)
            c.logprobs.extend(chunk.logprobs)
            if chunk.prompt_token_ids:
                c.prompt_logprobs.extend(chunk.prompt_logprobs)
                c.prompt_token_ids.extend(chunk.prompt_token_ids)
            c.prompt_tokens, c.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
            c.cached_tokens = chunk.cached_tokens
            if chunk.finish_reason:
                c.finish_reason, c.stop_sequence = chunk.finish_reason, chunk.stop_sequence
                if chunk.stop_token_id is not None:
                    c.stop_token_id = chunk.stop_token_id
                if chunk.timings is not None:
                    c.timings.CopyFrom(chunk.timings)
        ordered = [completions[k] for k in sorted(completions)]
        prompt_tokens = sum(c.prompt_tokens for c in ordered if c.index == 0)
        return generation_pb2.GenerateResponse(
            request_id=run.request_id, client_request_id=run.client_request_id, completions=ordered,
            usage=generation_pb2.Usage(prompt_tokens=prompt_tokens,
                                       completion_tokens=sum(c.completion_tokens for c in ordered),
                                       cached_tokens=sum(c.cached_tokens for c in ordered if c.index == 0)))

    async def GenerateStream(self, request, context):
        if len(request.inputs) > 1:
            raise InvalidArgument("GenerateStream takes one prompt; use Generate for several")
        async for run, chunk in self.router.execute(request, context.time_remaining(), self.scopes.caller(context),
                                                    _counted_elsewhere(context)):
            yield _stream_response(run, chunk)

    async def Abort(self, request, context):
        """Only the caller's own requests (by server id or client label); an admin key reaches all."""
        aborted = self.router.ledger.abort(request.request_id, self.scopes.caller(context))
        return generation_pb2.AbortResponse(aborted=aborted)

    async def Tokenize(self, request, context):
        return await self.router.off_loop(self._tokenize, request)

    def _tokenize(self, request) -> generation_pb2.TokenizeResponse:
        """Tokenizer thread."""
        builder = self.router.builder
        tok = builder.tokenizer
        if request.messages:
            ids = builder.chat(request.messages)
            offsets = [generation_pb2.Offset() for _ in ids]
        else:
            builder.check_text_size(len(request.text.encode("utf-8", "surrogatepass")), "the text")
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            enc = tok(request.text, add_special_tokens=add, return_offsets_mapping=True)
            ids = enc["input_ids"]
            offsets = [generation_pb2.Offset(start=s, end=e) for s, e in enc["offset_mapping"]]
        return generation_pb2.TokenizeResponse(token_ids=ids, offsets=offsets, tokens=tok.convert_ids_to_tokens(ids),
                                               max_model_len=self.router.card.max_model_len)

    async def Detokenize(self, request, context):
        vocab = self.router.card.vocab_size
        bad = next((t for t in request.token_ids if t >= vocab), None)
        if bad is not None:
            raise InvalidArgument(f"token ids must be < vocab size {vocab}, got {bad}")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await self.router.off_loop(lambda: self.router.builder.tokenizer.decode(
            list(request.token_ids), skip_special_tokens=skip))
        return generation_pb2.DetokenizeResponse(text=text)

    async def ModelInfo(self, request, context):
        card = self.router.card
        roles = sorted({n.role for n in self.router.registry.nodes.values()})
        return generation_pb2.ModelInfoResponse(
            model=card.name, max_model_len=card.max_model_len, vocab_size=card.vocab_size,
            block_size=card.block_size, roles=roles, eos_token_ids=card.eos_token_ids, dtype=card.dtype)

    async def ServerInfo(self, request, context):
        registry = self.router.registry
        return generation_pb2.ServerInfoResponse(
            version=_version(), model=self.router.card.name, nodes=[n.info() for n in registry.nodes.values()],
            active_requests=len(self.router.ledger))

    async def GetLoads(self, request, context):
        """Node loads and request ids; a caller without the admin key sees only its own requests' ids."""
        registry = self.router.registry
        await registry.poll_all()
        scope = self.scopes.caller(context)
        mine = self.router.ledger.ids(scope)
        nodes = [n.info() for n in registry.nodes.values()]
        if scope != ADMIN:
            own = set(mine)
            for info in nodes:
                ids = [i for i in info.load.request_ids if i.split(".", 1)[0] in own]
                del info.load.request_ids[:]
                info.load.request_ids.extend(ids)
        return generation_pb2.GetLoadsResponse(nodes=nodes, router_request_ids=mine)


class RouterControlServicer(router_pb2_grpc.RouterControlServicer):
    def __init__(self, router: Router):
        self.router = router

    async def Register(self, request, context):
        """Only with the node key (router.auth). The node is placed on once the router's own poll of
        it, on the claimed role's service, answered with the router's model."""
        if request.model != self.router.card.name:
            raise InvalidArgument(f"node serves {request.model[:200]!r}, the router {self.router.card.name!r}")
        refusal = convert.protocol_refusal(request.load.protocol)
        if refusal is not None:
            raise FailedPrecondition(refusal)
        node = self.router.registry.register(request)
        self.router.registry.suspect(node)
        return router_pb2.RegisterNodeResponse(accepted=True, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
                                               node_id=node.node_id)

    async def Drain(self, request, context):
        """Stops placing on the node at once, then asks it to drain (finish its work and exit)."""
        node = self.router.registry.nodes.get(request.node_id)
        if node is None:
            raise NotFound(f"no node {request.node_id[:200]!r} in this router's pool")
        node.draining = True
        if self.router.config.placement is not None:
            self.router.config.placement.stats.drains += 1
        try:
            await node.stub.Drain(node_pb2.NodeDrainRequest(), timeout=5.0)
        except grpc.aio.AioRpcError:
            return router_pb2.DrainNodeResponse(acknowledged=False)
        return router_pb2.DrainNodeResponse(acknowledged=True)

    async def Heartbeat(self, request, context):
        """Keeps a registration alive; `serving=false` (draining) takes the node out of placement. It
        never marks a node healthy: only the router's own polls do."""
        node = self.router.registry.nodes.get(request.node_id)
        if node is None:
            return router_pb2.HeartbeatResponse(known=False, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)
        node.draining = not request.serving
        return router_pb2.HeartbeatResponse(known=True, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)
