"""State and helpers both node servicers share (engine handle, stats, background cleanups)."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from engine.async_engine import AsyncEngine
from engine.config import ResolvedConfig
from engine.kv_transfer.base import KVSpec
from engine.rpc import convert
from engine.rpc.errors import InvalidArgument, Unavailable
from protos.pdserve.v1 import generation_pb2, node_pb2

logger = logging.getLogger("pdserve.node")

MAX_REQUEST_ID_CHARS = 256
DEFAULT_TIMEOUT_S = 60.0


@dataclass
class NodeStats:
    """Plain counters (S3 exports them to Prometheus)."""

    requests: int = 0
    finished: int = 0
    aborts: int = 0
    errors: int = 0
    kv_transfers: int = 0
    kv_transfer_failures: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_early_bytes: int = 0  # prefill: bytes sent while the prompt was still being prefilled
    kv_transfer_streams: int = 0  # decode: PushKV streams landed over gRPC (a transfer over N lanes: N)
    kv_transfer_seconds: float = 0.0
    leases_expired: int = 0
    rejected_frames: int = 0
    reservations_refused: int = 0
    prompt_tokens: int = 0  # prompt tokens prefilled (prefill nodes)
    cached_tokens: int = 0  # of which served from the prefix cache
    generation_tokens: int = 0  # tokens generated (decode nodes; prefill nodes count first tokens)


def check_request_id(request_id: str) -> str:
    if not request_id:
        raise InvalidArgument("request_id is empty")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    return request_id


def time_left(context, default: float = DEFAULT_TIMEOUT_S) -> float:
    remaining = context.time_remaining()
    return default if remaining is None else max(0.0, remaining)


class NodeServicerBase:
    role = "both"

    def __init__(self):
        self.engine: AsyncEngine | None = None
        self.spec: KVSpec | None = None
        self.stats = NodeStats()
        self.model_name = ""
        self.max_model_len = 0
        self.resolved: ResolvedConfig | None = None  # the engine's, once attached
        self.node_id = ""
        self._tasks: set[asyncio.Task] = set()
        self._active: dict[str, asyncio.Task] = {}  # request id -> the RPC task serving it
        self.draining = False
        self.request_stop = None  # set by serve_node: ends the node as SIGTERM does

    def attach(self, engine: AsyncEngine, ns) -> None:
        self.engine = engine
        self.spec = KVSpec.of_engine(engine.engine)
        self.model_name = engine.engine.model_name
        self.resolved = engine.engine.resolved
        self.max_model_len = self.resolved.max_model_len
        self.node_id = ns.node_id

    def ready_engine(self) -> AsyncEngine:
        if self.engine is None:
            raise Unavailable("the node is still loading its model")
        if not self.engine.healthy:
            raise Unavailable("the node's engine has failed")
        if self.draining:
            raise Unavailable("the node is shutting down")
        return self.engine

    def layout_proto(self):
        return self.spec.to_proto()

    def spawn(self, coro) -> asyncio.Task:
        """Runs a cleanup in the background (safe from finally blocks of cancelled RPCs)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def track(self, request_id: str) -> asyncio.Task:
        """Registers the RPC serving `request_id`; returns the token `untrack` needs."""
        if request_id in self._active:
            raise InvalidArgument(f"request id {request_id[:64]!r} is already active on this node")
        task = self._active[request_id] = asyncio.current_task()
        return task

    def untrack(self, request_id: str, task: asyncio.Task) -> None:
        """Forgets the RPC that `track` registered. The finally block of a streaming handler may run
        in another task (an async generator closed by the event loop's finalizer), so the entry is
        matched against the task returned by `track`, not the current one."""
        if self._active.get(request_id) is task:
            del self._active[request_id]

    def end_rpc(self, request_id: str, tracked: asyncio.Task, done: bool, abort) -> None:
        """The bookkeeping every request RPC does in its `finally`: forget it, count it as finished,
        or as aborted and run `abort()` (a coroutine factory) in the background to free its state."""
        self.untrack(request_id, tracked)
        if done:
            self.stats.finished += 1
        else:
            self.stats.aborts += 1
            self.spawn(abort())

    def cancel_active(self, request_id: str) -> bool:
        task = self._active.pop(request_id, None)
        if task is not None and not task.done():
            task.cancel()
            return True
        return False

    async def load_dict(self) -> dict:
        """The engine's published load snapshot: answers at once, also while a long step runs."""
        return self.engine.load_snapshot() if self.engine is not None and self.engine.healthy else {}

    def node_load(self, load: dict, extra_ids: set[str], leases: int) -> generation_pb2.NodeLoad:
        ids = set(load.get("request_ids", ())) | extra_ids | set(self._active)
        return generation_pb2.NodeLoad(
            num_waiting=load.get("num_waiting", 0), num_running=load.get("num_running", 0),
            free_blocks=load.get("free_blocks", 0), total_blocks=load.get("total_blocks", 0),
            active_leases=leases, queued_prompt_tokens=load.get("queued_prompt_tokens", 0),
            request_ids=sorted(ids), prefix_hashes=load.get("prefix_hashes", ()), draining=self.draining,
            model=self.model_name, protocol=convert.NODE_PROTOCOL)

    async def Drain(self, request, context):
        """RouterControl.Drain reaches the node here: the same path as SIGTERM (stop taking work,
        finish what runs, exit)."""
        self.draining = True
        if self.request_stop is not None:
            self.request_stop()
        return node_pb2.NodeDrainResponse(in_flight=len(self._active))

    async def drain(self, grace: float) -> None:
        """Stops taking work; waits up to `grace` seconds for in-flight requests."""
        self.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        while self._active and loop.time() < end:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in list(self._active.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
