"""Scripted node stubs for driving the router's `Pipeline` and `NodeRegistry` in process.

A `Cluster` hands out one script per Prefill / Decode call, in call order (a script is a list of
events, exceptions to raise, or `HANG`), answers Reserve (optionally refusing per node) and logs
every call, so a test can say which node got what. Given a tokenizer, a fake node streams text
like a real one (`NodeText`: the engine's own detokenizer and stop rules fill in each event's text,
held-back text and, where the script leaves it out, the finish); without one, events go out
exactly as scripted.
"""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc

from engine.detokenizer import IncrementalDetokenizer
from engine.output_processor import OutputProcessor, check_stop
from engine.rpc import convert
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import node_pb2
from router.pipeline import Pipeline, PipelineConfig
from router.prompts import Prompt
from router.registry import Node, NodeRegistry

FR = g.FinishReason
HANG = object()  # a read that never completes (a node waiting for KV that will not come)


class Slow:
    """A scripted item that arrives `seconds` after its read starts (a large KV transfer)."""

    def __init__(self, seconds: float, item):
        self.seconds, self.item = seconds, item
PROMPT = [1, 2, 3, 4, 5]


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details or code.name)


class NodeText:
    """What a node's engine adds to the tokens it streams, computed as the engine does
    (`engine.output_processor.check_stop` over an `IncrementalDetokenizer`): each event's text
    delta and held-back text, and its finish and stop where the script sets none. `replayed`: output
    tokens whose text the client already has (an imported first token, resumed tokens)."""

    def __init__(self, tokenizer, request, replayed=()):
        params, _ = convert.params_from_proto(request.params)
        self.req = SimpleNamespace(
            sampling_params=params, max_tokens=params.max_tokens, stop_reason=None,
            eos_token_ids=(tokenizer.eos_token_id,),
            detokenizer=IncrementalDetokenizer(tokenizer, list(request.prompt_token_ids), params))
        self.count = len(replayed)
        OutputProcessor.replay(self.req, list(replayed))

    def fill(self, event):
        if isinstance(event, node_pb2.PrefillEvent) and event.HasField("first_token"):
            self._fill(event.first_token, [event.first_token.token_id])
        elif isinstance(event, node_pb2.DecodeEvent):
            self._fill(event, event.token_ids)
        return event

    def _fill(self, msg, token_ids) -> None:
        reason = None
        for token_id in token_ids:
            self.count += 1
            reason = check_stop(self.req, token_id, self.count)
        if not msg.finish_reason and reason is not None:
            msg.finish_reason = convert.finish_reason_to_proto(reason.value)
            stop = self.req.stop_reason
            if isinstance(stop, str):
                msg.stop_sequence = stop
            elif isinstance(stop, int):
                msg.stop_token_id = stop
        msg.text = self.req.detokenizer.get_delta(finished=bool(msg.finish_reason))
        msg.held_text = self.req.detokenizer.held_back


class FakeCall:
    """A unary-stream call: read() returns scripted events (filled in by `text`, a `NodeText`,
    when given); cancel() makes a pending read raise CancelledError, as grpc.aio does for a call
    cancelled by another task."""

    def __init__(self, script, text: NodeText | None = None):
        self.script = list(script)
        self.text = text
        self.cancelled = False
        self._wake = asyncio.Event()

    async def read(self):
        if self.cancelled:
            raise asyncio.CancelledError()
        item = self.script.pop(0) if self.script else grpc.aio.EOF
        if item is HANG:
            await self._wake.wait()
            raise asyncio.CancelledError()
        if isinstance(item, Slow):
            await asyncio.sleep(item.seconds)
            item = item.item
        if isinstance(item, BaseException):
            raise item
        await asyncio.sleep(0)
        return self.text.fill(item) if self.text is not None and item is not grpc.aio.EOF else item

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.read()
        if item is grpc.aio.EOF:
            raise StopAsyncIteration
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        self._wake.set()
        return True


class Cluster:
    """Scripts for the Prefill and Decode calls, in call order; `reserve_errors[node_id]` are raised
    by that node's next Reserve calls, one each. Logs every call as (method, node_id, request) in
    `log` and every Abort's node id in `aborts`. `tokenizer`: the nodes stream text (`NodeText`)."""

    def __init__(self, prefill_scripts, decode_scripts, reserve_errors=None, first_token_id: int = 7,
                 tokenizer=None):
        self.prefill_scripts, self.decode_scripts = list(prefill_scripts), list(decode_scripts)
        self.tokenizer = tokenizer
        self.reserve_errors = {k: list(v) for k, v in (reserve_errors or {}).items()}
        self.first_token_id = first_token_id
        self.aborts: list[str] = []
        self.calls: list[FakeCall] = []
        self.log: list[tuple[str, str, object]] = []

    def called(self, method: str) -> list[str]:
        """The node ids `method` was called on, in order."""
        return [node_id for m, node_id, _ in self.log if m == method]

    def requests(self, method: str) -> list:
        return [request for m, _, request in self.log if m == method]

    def text(self, request, replayed=()) -> NodeText | None:
        return NodeText(self.tokenizer, request, replayed) if self.tokenizer is not None else None

    def stub(self, node_id: str, model: str = "m", poll=None):
        cluster = self

        class Stub:
            async def GetLoad(self, request, timeout=None):
                if poll is not None:
                    return await poll()
                return g.NodeLoad(free_blocks=60, total_blocks=64, model=model, protocol=convert.NODE_PROTOCOL)

            async def Reserve(self, request, timeout=None):
                cluster.log.append(("Reserve", node_id, request))
                errors = cluster.reserve_errors.get(node_id)
                if errors:
                    raise errors.pop(0)
                return node_pb2.ReserveResponse(reservation_id=f"res-{len(cluster.aborts)}", num_blocks=2,
                                                node_id=node_id)

            def Prefill(self, request, timeout=None):
                cluster.log.append(("Prefill", node_id, request))
                call = FakeCall(cluster.prefill_scripts.pop(0), cluster.text(request))
                cluster.calls.append(call)
                return call

            def Decode(self, request, timeout=None):
                cluster.log.append(("Decode", node_id, request))
                if not request.local_prefill:
                    assert request.first_token_id == cluster.first_token_id  # the token the client already has
                replayed = request.output_token_ids if request.local_prefill else [request.first_token_id]
                call = FakeCall(cluster.decode_scripts.pop(0), cluster.text(request, replayed))
                cluster.calls.append(call)
                return call

            async def Abort(self, request, timeout=None):
                cluster.aborts.append(node_id)
                return node_pb2.NodeAbortResponse(found=True)
        return Stub()


def first_token(token_id: int = 7, **fields) -> node_pb2.PrefillEvent:
    return node_pb2.PrefillEvent(first_token=node_pb2.FirstToken(token_id=token_id, **fields))


def transfer_done() -> node_pb2.PrefillEvent:
    return node_pb2.PrefillEvent(transfer_done=node_pb2.TransferDone(bytes=10, ms=1.0))


def tokens(*ids: int, finish: int = FR.FINISH_REASON_UNSPECIFIED, **fields) -> node_pb2.DecodeEvent:
    return node_pb2.DecodeEvent(token_ids=list(ids), finish_reason=finish, **fields)


def make_registry(cluster: Cluster, prefills=("prefill-0", "prefill-1"), decodes=("decode-0",)) -> NodeRegistry:
    registry = NodeRegistry()
    for role, ids in (("prefill", prefills), ("decode", decodes)):
        for node_id in ids:
            node = Node(node_id, f"127.0.0.1:{len(registry.nodes) + 1}", role, channel=None,
                        stub=cluster.stub(node_id), healthy=True,
                        load=g.NodeLoad(free_blocks=60, total_blocks=64))
            registry.nodes[node_id] = node
    return registry


async def collect(pipe: Pipeline, budget_s: float = 10.0) -> list:
    async def run():
        return [c async for c in pipe.run()]
    return await asyncio.wait_for(run(), budget_s)


def pipeline(registry, max_tokens: int = 4, params: SamplingParams | None = None,
             prompt_ids=PROMPT, **config) -> Pipeline:
    params = params or SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompt = Prompt(list(prompt_ids), params, max_tokens)
    cfg = PipelineConfig(**{"admission_wait_s": 0.5, **config})
    now = time.monotonic()
    return Pipeline(registry, cfg, prompt, 0, 0, "req-x.0.0", 0, now + 30.0, now)
