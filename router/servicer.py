"""Thin servicers: pdserve.v1.Generation (public) and pdserve.v1.RouterControl (nodes)."""
from __future__ import annotations

import asyncio
import importlib.metadata
import time
from dataclasses import dataclass

from engine.rpc.errors import InvalidArgument, NotFound
from protos.pdserve.v1 import generation_pb2, generation_pb2_grpc, router_pb2, router_pb2_grpc
from router.ledger import Ledger, RequestRun
from router.pipeline import Chunk, Pipeline, PipelineConfig
from router.prompts import PromptBuilder
from router.registry import HEARTBEAT_INTERVAL_MS, NodeRegistry

FR = generation_pb2.FinishReason
NO_DEADLINE_S = 3600.0
DEADLINE_MARGIN_S = 0.05  # end with TIME_LIMIT this long before the gRPC deadline, so the last chunk gets out


def _version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass
class ModelCard:
    name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    eos_token_ids: list[int]
    dtype: str


class Router:
    """Request execution shared by Generate and GenerateStream."""

    def __init__(self, registry: NodeRegistry, builder: PromptBuilder, card: ModelCard, config: PipelineConfig):
        self.registry, self.builder, self.card, self.config = registry, builder, card, config
        self.ledger = Ledger()
        self.metrics = None  # engine.metrics.Metrics when --metrics-port is set

    def check_model(self, name: str) -> None:
        if name and name != self.card.name:
            raise NotFound(f"model {name[:200]!r} is not served here (this server serves {self.card.name!r})")

    async def execute(self, request: generation_pb2.GenerateRequest, time_remaining: float | None):
        """Yields (run, chunk) for every chunk of every completion of the request."""
        arrival = time.monotonic()
        self.check_model(request.model)
        prompts = self.builder.build(request)
        limits = [NO_DEADLINE_S]
        if request.HasField("timeout_ms"):
            if request.timeout_ms == 0:
                raise InvalidArgument("timeout_ms must be > 0")
            limits.append(request.timeout_ms / 1000.0)
        if time_remaining is not None:
            limits.append(max(time_remaining - min(DEADLINE_MARGIN_S, 0.1 * time_remaining), 0.001))
        deadline = arrival + min(limits)
        run = self.ledger.open(request.client_request_id)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        pipelines = [Pipeline(self.registry, self.config, self.builder.tokenizer, prompt, p, i,
                              f"{run.request_id}.{p}.{i}", request.priority, deadline, arrival)
                     for p, prompt in enumerate(prompts) for i in range(prompt.params.n)]
        run.tasks = [loop.create_task(self._feed(run, pipe, queue)) for pipe in pipelines]
        timer = loop.call_at(deadline, run.end, FR.FINISH_REASON_TIME_LIMIT)
        tracker = self.metrics.track(arrival) if self.metrics is not None else None
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

    @staticmethod
    async def _feed(run: RequestRun, pipe: Pipeline, queue: asyncio.Queue) -> None:
        try:
            async for chunk in pipe.run():
                queue.put_nowait(chunk)
        except asyncio.CancelledError:
            if run.end_reason and not pipe.finished:
                queue.put_nowait(pipe.final_chunk(run.end_reason))
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the request's handler, which raises it
            queue.put_nowait(exc)


def _stream_response(run: RequestRun, chunk: Chunk) -> generation_pb2.GenerateStreamResponse:
    msg = generation_pb2.GenerateStreamResponse(
        request_id=run.request_id, client_request_id=run.client_request_id, index=chunk.index, text=chunk.text,
        token_ids=chunk.token_ids, logprobs=chunk.logprobs, finish_reason=chunk.finish_reason,
        stop_sequence=chunk.stop_sequence, prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens, cached_tokens=chunk.cached_tokens)
    if chunk.stop_token_id is not None:
        msg.stop_token_id = chunk.stop_token_id
    if chunk.timings is not None:
        msg.timings.CopyFrom(chunk.timings)
    return msg


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, router: Router):
        self.router = router

    async def Generate(self, request, context):
        completions: dict[tuple[int, int], generation_pb2.Completion] = {}
        run = None
        async for run, chunk in self.router.execute(request, context.time_remaining()):
            key = (chunk.prompt_index, chunk.index)
            c = completions.get(key)
            if c is None:
                c = completions[key] = generation_pb2.Completion(prompt_index=chunk.prompt_index, index=chunk.index)
            c.text += chunk.text
            c.token_ids.extend(chunk.token_ids)
            c.logprobs.extend(chunk.logprobs)
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
        async for run, chunk in self.router.execute(request, context.time_remaining()):
            yield _stream_response(run, chunk)

    async def Abort(self, request, context):
        return generation_pb2.AbortResponse(aborted=self.router.ledger.abort(request.request_id))

    async def Tokenize(self, request, context):
        tok = self.router.builder.tokenizer
        if request.messages:
            ids = self.router.builder.chat(request.messages)
            offsets = [generation_pb2.Offset() for _ in ids]
        else:
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
        text = self.router.builder.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
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
        registry = self.router.registry
        await registry.poll_all()
        return generation_pb2.GetLoadsResponse(nodes=[n.info() for n in registry.nodes.values()],
                                               router_request_ids=self.router.ledger.ids())


class RouterControlServicer(router_pb2_grpc.RouterControlServicer):
    def __init__(self, router: Router):
        self.router = router

    async def Register(self, request, context):
        if request.role not in ("prefill", "decode"):
            raise InvalidArgument(f"role must be prefill or decode, got {request.role[:32]!r}")
        if not request.address:
            raise InvalidArgument("address is required")
        if request.model and request.model != self.router.card.name:
            raise InvalidArgument(f"node serves {request.model[:200]!r}, the router {self.router.card.name!r}")
        node = self.router.registry.add(request.address, request.role, request.node_id or None)
        if request.HasField("layout"):
            node.layout = request.layout
        asyncio.get_running_loop().create_task(self.router.registry.poll(node))
        return router_pb2.RegisterNodeResponse(accepted=True, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
                                               node_id=node.node_id)

    async def Heartbeat(self, request, context):
        node = self.router.registry.nodes.get(request.node_id)
        if node is None:
            return router_pb2.HeartbeatResponse(known=False, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)
        if request.HasField("load"):
            node.load = request.load
        node.healthy = request.serving
        node.last_ok = time.monotonic()
        return router_pb2.HeartbeatResponse(known=True, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS)
