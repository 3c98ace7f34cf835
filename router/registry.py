"""The router's view of its nodes: address, role, health and last known load.

Nodes come from command-line flags and from RouterControl.Register. Every node has its own poll
loop reading its load (GetLoad, answered from the node's published snapshot) a few times a second.
Health tells the truth:
- a broken connection (UNAVAILABLE) marks a node down at once; a poll that only times out is a
  miss, and MISSES_DOWN consecutive misses mark it down (a frozen node: within ~3 s);
- a slow answer only lowers the node's placement score (`latency_s`: smoothed while answers are
  slow, back to the latest round trip as soon as one comes promptly, so a node that was slow once,
  on its first poll or in a burst, is not passed over for seconds after it recovered);
- a call that failed during a request does not mark anyone down: it makes the router poll that
  node now (`suspect`), so a healthy peer of a dead node is never blamed;
- a registered node is placed on only once a poll on its claimed role's service answered and
  named the router's model (its KV layout was checked at Register).
The pool's config (block size, dtype, max_model_len, KV layout) is learned from the first node
that registers (`PoolConfig`); a later node that disagrees, with it or with a value the router was
given on its command line, is refused with FAILED_PRECONDITION.
Between polls, placement keeps a local estimate (`pending_blocks`, `pending_prompt_tokens`) of
what it sent since the last reading.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import grpc

from engine.rpc import convert
from engine.rpc.channel import NODE_KEEPALIVE, aio_channel
from engine.rpc.errors import FailedPrecondition, InvalidArgument
from engine.rpc.security import ClientSecurity
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc

logger = logging.getLogger("pdserve.router")

POLL_INTERVAL_S = 0.3
POLL_TIMEOUT_S = 1.0
MISSES_DOWN = 3  # consecutive poll timeouts that mark a node down
HEARTBEAT_INTERVAL_MS = 1000
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class PoolConfig:
    """What every node of the pool agrees on, as the first node that registered said it."""

    node_id: str  # the node it was learned from (named in refusals)
    layout: node_pb2.KVLayout | None = None  # block size, KV geometry and the KV cache's dtype
    dtype: str = ""  # the model's dtype ("" until a node that sends it registered)
    max_model_len: int = 0  # 0: not known yet

    @property
    def block_size(self) -> int | None:
        return self.layout.block_size if self.layout is not None else None


def _layout_text(layout: node_pb2.KVLayout) -> str:
    return (f"{layout.num_layers} layers, block size {layout.block_size}, {layout.num_kv_heads} KV heads, "
            f"head dim {layout.head_dim}, {layout.dtype[:32]}")


@dataclass(eq=False)
class Node:
    node_id: str
    address: str
    role: str  # "prefill" | "decode"
    channel: grpc.aio.Channel = field(repr=False)
    stub: object = field(repr=False)
    healthy: bool = False
    load: generation_pb2.NodeLoad = field(default_factory=generation_pb2.NodeLoad)
    layout: node_pb2.KVLayout | None = None
    expected_model: str = ""  # set for registered nodes: polls must name this model
    last_ok: float = 0.0
    misses: int = 0  # consecutive poll timeouts
    latency_s: float = 0.0  # GetLoad round trip: smoothed upward, the latest when it fell
    draining: bool = False  # said so in a heartbeat: no new work until it re-registers
    poll_failed: bool = False  # its last poll failed (a node not polled yet counts as up)
    pending_blocks: int = 0  # reserved by the router since the last poll
    pending_prompt_tokens: int = 0  # sent for prefill since the last poll
    active: int = 0  # pipelines currently using this node
    _prefix_of: object = field(default=None, repr=False)
    _prefix: frozenset = field(default=frozenset(), repr=False)

    @property
    def gone(self) -> bool:
        """Down after a failed poll (a node not polled yet is not gone)."""
        return not self.healthy and self.poll_failed

    def mark_down(self, why: str) -> None:
        if self.healthy:
            logger.warning("node %s (%s) marked down: %s", self.node_id, self.address, why)
        self.healthy = False

    def prefix_set(self) -> frozenset[int]:
        """The reported prefix-cache hashes as a set (rebuilt once per new load report)."""
        if self._prefix_of is not self.load:
            self._prefix_of, self._prefix = self.load, frozenset(self.load.prefix_hashes)
        return self._prefix

    def info(self) -> generation_pb2.NodeInfo:
        return generation_pb2.NodeInfo(node_id=self.node_id, address=self.address, role=self.role,
                                       healthy=self.healthy, load=self.load)


def _stub_for(role: str, channel):
    return node_pb2_grpc.PrefillNodeStub(channel) if role == "prefill" else node_pb2_grpc.DecodeNodeStub(channel)


class NodeRegistry:
    def __init__(self, security: ClientSecurity | None = None, block_size: int | None = None,
                 dtype: str | None = None, max_model_len: int | None = None):
        """`block_size`, `dtype`, `max_model_len`: values the router was told (None: learn them from
        the nodes); a node that disagrees is refused."""
        self.nodes: dict[str, Node] = {}  # by node id
        self.security = security
        self.block_size, self.dtype, self.max_model_len = block_size, dtype, max_model_len
        self.pool: PoolConfig | None = None  # learned at the first Register
        self.on_pool: Callable[[PoolConfig], None] | None = None  # called when `pool` changes
        self._loops: dict[str, asyncio.Task] = {}
        self._interval: float | None = None
        self._checks: set[asyncio.Task] = set()
        self.changed = asyncio.Event()  # set after each poll

    def add(self, address: str, role: str, node_id: str | None = None) -> Node:
        """A node from the command line (trusted: no model check), or the one already at `address`."""
        for node in self.nodes.values():
            if node.address == address:
                return node
        return self._new(address, role, node_id)

    def register(self, request) -> Node:
        """RouterControl.Register: a new node, or the same node again. Never changes the address or
        role a node id or address already has."""
        role, address = request.role, request.address
        if role not in ROLES:
            raise InvalidArgument(f"role must be prefill or decode, got {role[:32]!r}")
        if not address or len(address) > 256:
            raise InvalidArgument("address is required (host:port, at most 256 characters)")
        known = self.nodes.get(request.node_id) if request.node_id else None
        at_address = next((n for n in self.nodes.values() if n.address == address), None)
        for node in {known, at_address} - {None}:
            if node.address != address or node.role != role:
                raise FailedPrecondition(f"node {node.node_id!r} is registered as a {node.role} node at another "
                                         "address or role; a node's address and role never change")
        try:
            self._check_config(request)
        except FailedPrecondition:
            if not self._pool_is_down({known, at_address}):
                raise
            self._forget_pool(request)  # every node of the old config is gone: this one starts the new pool
            self._check_config(request)  # the router's own flags still apply
        node = known or at_address
        if node is None:
            node = self._new(address, role, request.node_id or None)
            node.expected_model = request.model
        if request.HasField("layout"):
            node.layout = request.layout
        self._learn(node.node_id, request)
        node.draining = False
        return node

    def _check_config(self, request) -> None:
        """Refuses a node whose block size, dtype, max_model_len or KV layout differs from the
        router's flags or from the pool's (FAILED_PRECONDITION, naming both values)."""
        layout = request.layout if request.HasField("layout") else None
        pool = self.pool or PoolConfig("")
        told = "this router's --{}".format
        learned = f"node {pool.node_id}'s"
        checks = [("KV block size", layout.block_size if layout else None,
                   (self.block_size, told("block-size")), (pool.block_size, learned), "--block-size"),
                  ("dtype", request.dtype or None, (self.dtype, told("dtype")), (pool.dtype or None, learned),
                   "--dtype"),
                  ("max_model_len", request.max_model_len or None, (self.max_model_len, told("max-model-len")),
                   (pool.max_model_len or None, learned), "--max-model-len")]
        for what, mine, *theirs, flag in checks:
            for value, whose in theirs:
                if mine is not None and value is not None and mine != value:
                    raise FailedPrecondition(f"the node's {what} is {str(mine)[:32]}, {whose} is {value}: every "
                                             f"node of a pool needs the same {flag}")
        if layout is None or pool.layout is None:
            return
        if layout.dtype != pool.layout.dtype:
            raise FailedPrecondition(f"the node's KV cache dtype is {layout.dtype[:32]}, {learned} is "
                                     f"{pool.layout.dtype}: every node of a pool needs the same --kv-cache-dtype "
                                     "(and --dtype)")
        if layout != pool.layout:
            raise FailedPrecondition(f"the node's KV layout ({_layout_text(layout)}) differs from {learned} "
                                     f"({_layout_text(pool.layout)}): every node of a pool serves the same model")

    def _pool_is_down(self, exclude: set) -> bool:
        """No node of the learned pool config is serving any more: every other node is down, its
        last poll failed (a node not polled yet counts as up)."""
        others = [n for n in self.nodes.values() if n not in exclude]
        return self.pool is not None and all(n.gone for n in others)

    def _forget_pool(self, request) -> None:
        """A whole pool restarted with another config (a rolling change of --max-model-len, say):
        the learned config goes, and so do the registered nodes that are down, so each must
        register again and be checked against the new pool before it is placed on (command-line
        nodes stay: they are trusted, as always)."""
        gone = [n for n in self.nodes.values() if n.expected_model and n.gone and n.address != request.address]
        logger.warning("no node of the pool is up: forgetting the pool config learned from %s; node %s at %s "
                       "starts the new pool (%d down nodes must register again)", self.pool.node_id,
                       request.node_id or "(new)", request.address[:64], len(gone))
        self.pool = None
        for node in gone:
            del self.nodes[node.node_id]
            loop = self._loops.pop(node.node_id, None)
            if loop is not None:
                loop.cancel()
            closing = asyncio.ensure_future(node.channel.close())
            self._checks.add(closing)
            closing.add_done_callback(self._checks.discard)

    def _learn(self, node_id: str, request) -> None:
        """The pool's config: the first registered node's, completed by later ones (that agree)."""
        pool = self.pool or PoolConfig(node_id)
        layout = pool.layout
        if layout is None and request.HasField("layout"):
            layout = node_pb2.KVLayout()
            layout.CopyFrom(request.layout)
        learned = replace(pool, layout=layout, dtype=pool.dtype or request.dtype,
                          max_model_len=pool.max_model_len or request.max_model_len)
        if learned != self.pool:
            self.pool = learned
            logger.info("pool config from node %s: %s, dtype %s, max_model_len %s", learned.node_id,
                        _layout_text(learned.layout) if learned.layout is not None else "no KV layout",
                        learned.dtype or "unknown", learned.max_model_len or "unknown")
            if self.on_pool is not None:
                self.on_pool(learned)

    def _new(self, address: str, role: str, node_id: str | None) -> Node:
        if role not in ROLES:
            raise ValueError(f"node role must be prefill or decode, got {role!r}")
        if node_id is None or node_id in self.nodes:
            index = sum(1 for n in self.nodes.values() if n.role == role)
            node_id = f"{role}-{index}"
            while node_id in self.nodes:
                index += 1
                node_id = f"{role}-{index}"
        channel = aio_channel(address, options=NODE_KEEPALIVE, security=self.security)
        node = Node(node_id, address, role, channel, _stub_for(role, channel))
        self.nodes[node_id] = node
        if self._interval is not None:
            self._start_loop(node)
        return node

    def by_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == role]

    def healthy(self, role: str) -> list[Node]:
        return [n for n in self.by_role(role) if n.healthy and not n.draining and not n.load.draining]

    @property
    def ready(self) -> bool:
        """A healthy decode node, and a healthy prefill node unless there is no prefill pool at all
        (colocated: the decode nodes run their own prompts)."""
        prefill_ok = bool(self.healthy("prefill")) or not self.by_role("prefill")
        return prefill_ok and bool(self.healthy("decode"))

    async def poll(self, node: Node, timeout: float = POLL_TIMEOUT_S) -> bool:
        start = time.monotonic()
        try:
            load = await node.stub.GetLoad(node_pb2.NodeLoadRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self._missed(node, exc)
            return False
        refusal = convert.protocol_refusal(load.protocol)
        if refusal is None and node.expected_model and load.model != node.expected_model:
            refusal = f"serves model {load.model[:100]!r}, registered for {node.expected_model[:100]!r}"
        if refusal is not None:
            node.poll_failed = True
            node.mark_down(refusal)
            return False
        if not node.healthy:
            logger.info("node %s (%s) is up", node.node_id, node.address)
        rtt = time.monotonic() - start
        node.latency_s = rtt if not node.last_ok or rtt <= node.latency_s else 0.7 * node.latency_s + 0.3 * rtt
        node.load, node.healthy, node.last_ok, node.misses, node.poll_failed = load, True, time.monotonic(), 0, False
        node.pending_blocks = node.pending_prompt_tokens = 0
        self._notify()
        return True

    def _missed(self, node: Node, exc: grpc.aio.AioRpcError) -> None:
        node.poll_failed = True
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            node.misses += 1
            if node.misses >= MISSES_DOWN:
                node.mark_down(f"{node.misses} GetLoad polls in a row timed out")
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            node.mark_down(f"it does not serve the {node.role} role")
        else:  # UNAVAILABLE (connection refused or broken), UNAUTHENTICATED, ...
            node.mark_down(f"GetLoad: {code.name}")

    def suspect(self, node: Node) -> None:
        """A call to `node` failed: poll it now rather than waiting for its loop."""
        task = asyncio.get_running_loop().create_task(self.poll(node))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(n) for n in list(self.nodes.values())))

    def start(self, interval: float = POLL_INTERVAL_S) -> None:
        self._interval = interval
        for node in self.nodes.values():
            self._start_loop(node)

    def _start_loop(self, node: Node) -> None:
        async def loop():
            while True:
                await self.poll(node)
                await asyncio.sleep(self._interval)
        self._loops[node.node_id] = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        tasks = [*self._loops.values(), *self._checks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(n.channel.close() for n in self.nodes.values()), return_exceptions=True)
