"""Which nodes serve a request.

Decode: among healthy decode nodes with enough free KV blocks for prompt + max_tokens (from
the last poll, minus what the router reserved since), the least loaded. Prefill: the healthy
prefill node with the fewest queued prompt tokens. A node whose load polls answer slowly
(`SLOW_POLL_S`) is still placed on, after every node that answers promptly.
"""
from __future__ import annotations

from router.registry import Node

SLOW_POLL_S = 0.25  # a GetLoad round trip this long means the node is struggling (it answers from a snapshot)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def free_blocks(node: Node) -> int:
    return node.load.free_blocks - node.pending_blocks


def pick_decode(nodes: list[Node], need_blocks: int, exclude: set[str] = frozenset()) -> Node | None:
    fits = [n for n in nodes if n.healthy and n.node_id not in exclude and free_blocks(n) >= need_blocks]
    if not fits:
        return None
    return min(fits, key=lambda n: (slow(n), n.load.num_running + n.load.num_waiting + n.active, -free_blocks(n)))


def pick_prefill(nodes: list[Node], exclude: set[str] = frozenset()) -> Node | None:
    live = [n for n in nodes if n.healthy and n.node_id not in exclude]
    if not live:
        return None
    return min(live, key=lambda n: (slow(n), n.load.queued_prompt_tokens + n.pending_prompt_tokens, n.active))


def slow(node: Node) -> bool:
    return node.latency_s > SLOW_POLL_S
