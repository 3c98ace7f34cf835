"""Scripted node stubs for driving the router's `Pipeline` and `NodeRegistry` in process.

A `Cluster` hands out one script per Prefill / Decode call, in call order (a script is a list of
events, exceptions to raise, or `HANG`), answers Reserve (optionally refusing per node) and logs
every call, so a test can say which node got what.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import node_pb2
from router.pipeline import Pipeline, PipelineConfig
from router.prompts import Prompt
from router.registry import Node, NodeRegistry

FR = g.FinishReason
HANG = object()  # a read that never completes (a node waiting for KV that will not come)
PROMPT = [1, 2, 3, 4, 5]


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details or code.name)


class FakeCall:
    """A unary-stream call: read() returns scripted events; cancel() makes a pending read raise
    CancelledError, as grpc.aio does for a call cancelled by another task."""

    def __init__(self, script):
        self.script = list(script)
        self.cancelled = False
        self._wake = asyncio.Event()

    async def read(self):
        if self.cancelled:
            raise asyncio.CancelledError()
        item = self.script.pop(0) if self.script else grpc.aio.EOF
        if item is HANG:
            await self._wake.wait()
            raise asyncio.CancelledError()
        if isinstance(item, BaseException):
            raise item
        await asyncio.sleep(0)
        return item

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
    `log` and every Abort's node id in `aborts`."""

    def __init__(self, prefill_scripts, decode_scripts, reserve_errors=None, first_token_id: int = 7):
        self.prefill_scripts, self.decode_scripts = list(prefill_scripts), list(decode_scripts)
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

    def stub(self, node_id: str, model: str = "m", poll=None):
        cluster = self

        class Stub:
            async def GetLoad(self, request, timeout=None):
                if poll is not None:
                    return await poll()
                return g.NodeLoad(free_blocks=60, total_blocks=64, model=model)

            async def Reserve(self, request, timeout=None):
                cluster.log.append(("Reserve", node_id, request))
                errors = cluster.reserve_errors.get(node_id)
                if errors:
                    raise errors.pop(0)
                return node_pb2.ReserveResponse(reservation_id=f"res-{len(cluster.aborts)}", num_blocks=2,
                                                node_id=node_id)

            def Prefill(self, request, timeout=None):
                cluster.log.append(("Prefill", node_id, request))
                call = FakeCall(cluster.prefill_scripts.pop(0))
                cluster.calls.append(call)
                return call

            def Decode(self, request, timeout=None):
                cluster.log.append(("Decode", node_id, request))
                if not request.local_prefill:
                    assert request.first_token_id == cluster.first_token_id  # the token the client already has
                call = FakeCall(cluster.decode_scripts.pop(0))
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


def pipeline(registry, tokenizer, max_tokens: int = 4, params: SamplingParams | None = None,
             prompt_ids=PROMPT, **config) -> Pipeline:
    params = params or SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompt = Prompt(list(prompt_ids), params, max_tokens)
    cfg = PipelineConfig(**{"admission_wait_s": 0.5, **config})
    now = time.monotonic()
    return Pipeline(registry, cfg, tokenizer, prompt, 0, 0, "req-x.0.0", 0, now + 30.0, now)
