"""Placement policies, one per pool (`--prefill-policy`, `--decode-policy`).

    round-robin   each healthy node in turn
    least-load    the node with the least work (decode: requests; prefill: prompt tokens queued)
                  (every policy places on a node whose load polls answer slowly only when no prompt
                  node can take the work)
    prefix        the least *cost*, where a prompt's cached prefix on a node is work it saves:
                    prefill cost = tokens queued there + this prompt's uncached tokens
                    decode cost  = requests there x DECODE_REQUEST_TOKENS - this prompt's cached tokens

A node's cached prefixes come from its GetLoad reports (`NodeLoad.prefix_hashes`, the chain hashes
of its prefix-cache blocks); a prompt's hashes come from the engine's own `block_hashes`
(`Prompt.block_hashes`, once per prompt for all its completions), so they match. Load counts work at the moment it is placed (`Node.active`, `pending_prompt_tokens`,
`pending_blocks`), not only from the last report, so a burst between two polls spreads out.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

from router.placement import free_blocks, slow
from router.registry import Node

DECODE_REQUEST_TOKENS = 256  # a running decode request weighs this many prompt tokens of prefix reuse
POLICIES = ("round-robin", "least-load", "prefix")
# The decode node prefills a prompt itself when at most this many of its tokens are uncached there.
# Measured (bench/local_prefill_bench.py, docs/PERFORMANCE.md): on CPU, 64 new tokens prefilled locally
# halve the follow-up's TTFT and raise the bystanders' inter-token p99 by 8 %; 256 raise it 3.5x.
DEFAULT_LOCAL_PREFILL_TOKENS = 64


@dataclass(frozen=True)
class Choice:
    node: Node
    cached_tokens: int  # prompt tokens this node holds in its prefix cache (as last reported)


def cached_tokens(node: Node, hashes: list[int], block_size: int) -> int:
    """Leading prompt blocks found in the node's reported prefix cache, in tokens."""
    known = node.prefix_set()
    n = 0
    for h in hashes:
        if h not in known:
            break
        n += 1
    return n * block_size


def decode_load(node: Node) -> int:
    return node.load.num_running + node.load.num_waiting + node.active


def prefill_load(node: Node) -> int:
    return node.load.queued_prompt_tokens + node.pending_prompt_tokens


class Policy:
    """Orders the candidates of one pool; `pick` returns the best, or None."""

    def __init__(self, name: str, pool: str, block_size: int):
        if name not in POLICIES:
            raise ValueError(f"placement policy must be one of {', '.join(POLICIES)}, got {name!r}")
        self.name, self.pool, self.block_size = name, pool, block_size
        self._turn = itertools.count()
        self.load: Callable[[Node], int] = decode_load if pool == "decode" else prefill_load

    def pick(self, nodes: list[Node], hashes: list[int], num_prompt_tokens: int,
             exclude: set[str] = frozenset(), need_blocks: int = 0) -> Choice | None:
        live = [n for n in nodes if n.healthy and not n.load.draining and n.node_id not in exclude
                and (need_blocks == 0 or free_blocks(n) >= need_blocks)]
        if not live:
            return None
        choices = [Choice(n, cached_tokens(n, hashes, self.block_size) if hashes else 0) for n in live]
        prompt = [c for c in choices if not slow(c.node)] or choices  # slow pollers only when nothing else
        if self.name == "round-robin":
            return prompt[next(self._turn) % len(prompt)]
        if self.name == "least-load":
            return min(prompt, key=lambda c: (self.load(c.node), -free_blocks(c.node), -c.cached_tokens))
        return min(prompt, key=lambda c: (self._cost(c, num_prompt_tokens), self.load(c.node), -free_blocks(c.node)))

    def _cost(self, choice: Choice, num_prompt_tokens: int) -> int:
        if self.pool == "prefill":
            return self.load(choice.node) + num_prompt_tokens - choice.cached_tokens
        return self.load(choice.node) * DECODE_REQUEST_TOKENS - choice.cached_tokens


@dataclass
class PlacementStats:
    """What placement decided, for the router's metrics."""

    cached_tokens: dict[str, int] = field(default_factory=dict)  # node id -> prompt tokens placed on its cache
    prefills_skipped: int = 0  # prompts a decode node prefilled itself (short uncached part)
    failovers: int = 0  # completions moved to another decode node mid-stream
    drains: int = 0  # nodes drained through RouterControl.Drain

    def placed(self, choice: Choice) -> None:
        if choice.cached_tokens:
            node_id = choice.node.node_id
            self.cached_tokens[node_id] = self.cached_tokens.get(node_id, 0) + choice.cached_tokens


class Placement:
    """The router's placement state: one policy per pool, the local-prefill threshold, stats."""

    def __init__(self, block_size: int, prefill_policy: str = "prefix", decode_policy: str = "prefix",
                 local_prefill_tokens: int = 0):
        if local_prefill_tokens < 0:
            raise ValueError(f"local_prefill_tokens must be >= 0, got {local_prefill_tokens}")
        self.block_size = block_size
        self.prefill = Policy(prefill_policy, "prefill", block_size)
        self.decode = Policy(decode_policy, "decode", block_size)
        self.local_prefill_tokens = local_prefill_tokens
        self.stats = PlacementStats()

    def set_block_size(self, block_size: int) -> None:
        """The pool's block size, learned from its nodes (prefix hashes are over blocks of it)."""
        self.block_size = self.prefill.block_size = self.decode.block_size = block_size

    def prefill_locally(self, choice: Choice | None, num_prompt_tokens: int) -> bool:
        """Decode node first, then decide: its own prefill pays when what it has not cached is short."""
        return (choice is not None and self.local_prefill_tokens > 0
                and num_prompt_tokens - choice.cached_tokens <= self.local_prefill_tokens)


class PlacementCollector:
    """Prometheus view of `PlacementStats` (registered on the router's metrics registry):
    <prefix>placement_cached_tokens{node}, placement_prefills_skipped, placement_failovers,
    placement_drains (all counters)."""

    def __init__(self, stats: PlacementStats, model_name: str, prefix: str):
        self.stats, self.model_name, self.prefix = stats, model_name, prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        labels = ["model_name", "role"]
        cached = CounterMetricFamily(self.prefix + "placement_cached_tokens",
                                     "Prompt tokens placed on a node that had them in its prefix cache.",
                                     labels=[*labels, "node"])
        for node_id, tokens in sorted(self.stats.cached_tokens.items()):
            cached.add_metric([self.model_name, "router", node_id], tokens)
        yield cached
        for name, doc, value in (
                ("placement_prefills_skipped", "Prompts a decode node prefilled itself (short uncached part).",
                 self.stats.prefills_skipped),
                ("placement_failovers", "Completions moved to another decode node mid-stream.", self.stats.failovers),
                ("placement_drains", "Nodes drained through RouterControl.Drain.", self.stats.drains)):
            family = CounterMetricFamily(self.prefix + name, doc, labels=labels)
            family.add_metric([self.model_name, "router"], value)
            yield family
