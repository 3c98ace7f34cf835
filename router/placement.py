"""What placement reads of a node (the policies themselves are in router/policy.py): KV blocks
free for new work (the last poll minus what the router reserved since), and whether its load polls
answer slowly (`SLOW_POLL_S`): a slow node is still placed on, after every node that answers
promptly.
"""
from __future__ import annotations

from router.registry import Node

SLOW_POLL_S = 0.25  # a GetLoad round trip this long means the node is struggling (it answers from a snapshot)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def free_blocks(node: Node) -> int:
    return node.load.free_blocks - node.pending_blocks


def slow(node: Node) -> bool:
    return node.latency_s > SLOW_POLL_S
