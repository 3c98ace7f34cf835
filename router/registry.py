"""The router's view of its nodes: address, role, health and last known load.

Nodes come from command-line flags and from RouterControl.Register. A poller reads every
node's load (GetLoad) a few times a second; a node whose poll or call fails is marked down and
skipped by placement until a poll succeeds again. Between polls, placement keeps a local
estimate (`pending_blocks`, `pending_prompt_tokens`) of what it sent since the last reading.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from engine.rpc.channel import aio_channel
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc

logger = logging.getLogger("pdserve.router")

POLL_INTERVAL_S = 0.3
POLL_TIMEOUT_S = 1.0
HEARTBEAT_INTERVAL_MS = 1000


@dataclass(eq=False)
class Node:
    node_id: str
    address: str
    role: str  # "prefill" | "decode" | "both"
    channel: grpc.aio.Channel = field(repr=False)
    stub: object = field(repr=False)
    healthy: bool = False
    load: generation_pb2.NodeLoad = field(default_factory=generation_pb2.NodeLoad)
    layout: node_pb2.KVLayout | None = None
    last_ok: float = 0.0
    pending_blocks: int = 0  # reserved by the router since the last poll
    pending_prompt_tokens: int = 0  # sent for prefill since the last poll
    active: int = 0  # pipelines currently using this node

    def mark_down(self, why: str) -> None:
        if self.healthy:
            logger.warning("node %s (%s) marked down: %s", self.node_id, self.address, why)
        self.healthy = False

    def info(self) -> generation_pb2.NodeInfo:
        return generation_pb2.NodeInfo(node_id=self.node_id, address=self.address, role=self.role,
                                       healthy=self.healthy, load=self.load)


def _stub_for(role: str, channel):
    return node_pb2_grpc.PrefillNodeStub(channel) if role == "prefill" else node_pb2_grpc.DecodeNodeStub(channel)


class NodeRegistry:
    def __init__(self):
        self.nodes: dict[str, Node] = {}  # by node id
        self._poller: asyncio.Task | None = None
        self.changed = asyncio.Event()  # set after each poll round

    def add(self, address: str, role: str, node_id: str | None = None) -> Node:
        for node in self.nodes.values():
            if node.address == address:
                if role != node.role:
                    node.role, node.stub = role, _stub_for(role, node.channel)
                return node
        if role not in ("prefill", "decode"):
            raise ValueError(f"node role must be prefill or decode, got {role!r}")
        if node_id is None or node_id in self.nodes:
            index = sum(1 for n in self.nodes.values() if n.role == role)
            node_id = f"{role}-{index}"
            while node_id in self.nodes:
                index += 1
                node_id = f"{role}-{index}"
        channel = aio_channel(address)
        node = Node(node_id, address, role, channel, _stub_for(role, channel))
        self.nodes[node_id] = node
        return node

    def by_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == role]

    def healthy(self, role: str) -> list[Node]:
        return [n for n in self.by_role(role) if n.healthy]

    @property
    def ready(self) -> bool:
        """A healthy decode node, and a healthy prefill node unless there is no prefill pool at all
        (colocated: the decode nodes run their own prompts)."""
        prefill_ok = bool(self.healthy("prefill")) or not self.by_role("prefill")
        return prefill_ok and bool(self.healthy("decode"))

    async def poll(self, node: Node, timeout: float = POLL_TIMEOUT_S) -> bool:
        try:
            load = await node.stub.GetLoad(node_pb2.NodeLoadRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            node.mark_down(f"GetLoad: {exc.code().name}")
            return False
        if not node.healthy:
            logger.info("node %s (%s) is up", node.node_id, node.address)
        node.load, node.healthy, node.last_ok = load, True, time.monotonic()
        node.pending_blocks = node.pending_prompt_tokens = 0
        return True

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(n) for n in list(self.nodes.values())))
        self.changed.set()
        self.changed = asyncio.Event()

    def start(self, interval: float = POLL_INTERVAL_S) -> None:
        async def loop():
            while True:
                await self.poll_all()
                await asyncio.sleep(interval)
        self._poller = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*(n.channel.close() for n in self.nodes.values()), return_exceptions=True)
