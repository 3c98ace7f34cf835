"""router/placement.py and router/policy.py in process: prefix affinity, load scores, slow / down /
draining nodes, block room, and no node at all."""
from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, block_hashes
from protos.pdserve.v1 import generation_pb2 as g
from router.placement import SLOW_POLL_S, blocks_needed, free_blocks, slow
from router.policy import DECODE_REQUEST_TOKENS, Choice, Placement, PlacementStats, Policy, cached_tokens
from router.registry import Node

BS = 4
BS16 = 16  # the served default block size
PROMPT = list(range(100, 112))  # 3 full blocks of 4
HASHES = block_hashes(PROMPT, BS)


def node(node_id: str, role: str = "prefill", healthy: bool = True, latency_s: float = 0.0, **load):
    load = {"free_blocks": 60, "total_blocks": 64, **load}
    return Node(node_id, f"addr-{node_id}", role, channel=None, stub=None, healthy=healthy,
                load=g.NodeLoad(**load), latency_s=latency_s)


def pick(policy: Policy, nodes, hashes=HASHES, exclude=frozenset(), need_blocks=0) -> str | None:
    choice = policy.pick(nodes, hashes, len(PROMPT), set(exclude), need_blocks)
    return choice.node.node_id if choice is not None else None


# ---- what placement reads of a node ------------------------------------------------------------

def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 16) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]


def test_free_blocks_counts_what_the_router_reserved_since_the_last_poll():
    n = node("d", "decode", free_blocks=10)
    n.pending_blocks = 3
    assert free_blocks(n) == 7


def test_slow_is_a_poll_round_trip_above_the_threshold():
    assert not slow(node("a", latency_s=SLOW_POLL_S)) and slow(node("b", latency_s=SLOW_POLL_S + 0.01))


def test_cached_tokens_counts_leading_blocks_only():
    assert cached_tokens(node("a", prefix_hashes=HASHES[:2]), HASHES, BS) == 2 * BS
    assert cached_tokens(node("b", prefix_hashes=HASHES[1:]), HASHES, BS) == 0  # no first block: no prefix
    assert cached_tokens(node("c"), HASHES, BS) == 0


# ---- prefix affinity and load ------------------------------------------------------------------

def test_prefix_policy_sends_a_prompt_where_its_prefix_is_cached():
    policy = Policy("prefix", "prefill", BS)
    nodes = [node("cold"), node("warm", prefix_hashes=HASHES[:2])]
    choice = policy.pick(nodes, HASHES, len(PROMPT))
    assert (choice.node.node_id, choice.cached_tokens) == ("warm", 2 * BS)


def test_prefill_prefix_cost_is_queued_plus_uncached_tokens():
    policy = Policy("prefix", "prefill", BS)
    warm = node("warm", prefix_hashes=HASHES, queued_prompt_tokens=13)  # cost 13 + 12 - 12 = 13
    cold = node("cold", queued_prompt_tokens=0)  # cost 0 + 12 = 12
    assert pick(policy, [warm, cold]) == "cold"
    cold.pending_prompt_tokens = 2  # sent since its last poll: cost 14
    assert pick(policy, [warm, cold]) == "warm"


def test_decode_prefix_cost_weighs_each_request_against_cached_tokens():
    policy = Policy("prefix", "decode", BS)
    warm = node("warm", "decode", prefix_hashes=HASHES, num_running=1)  # 1 x 256 - 12
    cold = node("cold", "decode")  # 0
    assert pick(policy, [warm, cold]) == "cold"
    assert DECODE_REQUEST_TOKENS > len(PROMPT)  # a running request outweighs this prompt's whole prefix
    warm.load.num_running = 0
    assert pick(policy, [cold, warm]) == "warm"  # same load: the cached prefix wins


def test_least_load_ignores_the_prefix_and_counts_router_side_work():
    policy = Policy("least-load", "decode", BS)
    busy = node("busy", "decode", prefix_hashes=HASHES, num_running=2)
    idle = node("idle", "decode", num_waiting=1)
    assert pick(policy, [busy, idle]) == "idle"
    idle.active = 2  # pipelines placed there since its last poll
    assert pick(policy, [busy, idle]) == "busy"  # idle now counts 1 + 2, busy 2


def test_least_load_breaks_ties_by_free_blocks_then_cached_tokens():
    policy = Policy("least-load", "prefill", BS)
    assert pick(policy, [node("a", free_blocks=10), node("b", free_blocks=20)]) == "b"
    assert pick(policy, [node("a"), node("b", prefix_hashes=HASHES[:1])]) == "b"


# ---- slow, down, draining, full, excluded --------------------------------------------------------

@pytest.mark.parametrize("name", ["prefix", "least-load", "round-robin"])
def test_a_slow_node_is_placed_on_only_when_no_prompt_node_can_take_the_work(name):
    policy = Policy(name, "prefill", BS)
    slow_warm = node("slow", prefix_hashes=HASHES, latency_s=1.0)
    prompt_cold = node("prompt", queued_prompt_tokens=500)
    assert pick(policy, [slow_warm, prompt_cold]) == "prompt"
    assert pick(policy, [slow_warm, prompt_cold], exclude={"prompt"}) == "slow"  # slow, but still a node


def test_down_draining_excluded_and_full_nodes_are_never_picked():
    policy = Policy("prefix", "decode", BS)
    down = node("down", "decode", healthy=False)
    draining = node("draining", "decode", draining=True)
    full = node("full", "decode", free_blocks=3)
    ok = node("ok", "decode", num_running=5)
    assert pick(policy, [down, draining, full, ok], need_blocks=4) == "ok"
    assert pick(policy, [down, draining, full, ok], need_blocks=4, exclude={"ok"}) is None
    assert pick(policy, [full], need_blocks=0) == "full"  # need_blocks 0: room is not checked


def test_no_node_is_none():
    assert Policy("prefix", "prefill", BS).pick([], HASHES, len(PROMPT)) is None


def test_without_hashes_nothing_counts_as_cached():
    choice = Policy("prefix", "prefill", BS).pick([node("warm", prefix_hashes=HASHES)], [], len(PROMPT))
    assert choice.cached_tokens == 0


def test_an_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="placement policy must be one of round-robin, least-load, prefix, got 'x'"):
        Policy("x", "prefill", BS)


# ---- local prefill and stats -------------------------------------------------------------------

def test_local_prefill_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="local_prefill_tokens must be >= 0, got -1"):
        Placement(BS, local_prefill_tokens=-1)


def test_stats_count_cached_tokens_per_node():
    stats = PlacementStats()
    stats.placed(Choice(node("a"), 8))
    stats.placed(Choice(node("a"), 4))
    stats.placed(Choice(node("b"), 0))
    assert stats.cached_tokens == {"a": 12}


# ---- prompt hashes vs the block manager, policy crossovers, metrics, the local-prefill threshold ---
def test_prompt_hashes_match_the_engines_prefix_cache():
    tokens = list(range(1000, 1000 + 5 * BS16 + 7))  # 5 full blocks and a partial one
    bm = BlockManager(num_blocks=16, block_size=BS16, enable_prefix_caching=True)
    blocks = bm.allocate(6)
    bm.cache_full_blocks(blocks, tokens, len(tokens))
    assert set(block_hashes(tokens, BS16)) == set(bm.recent_hashes(100)) and len(block_hashes(tokens, BS16)) == 5
    assert bm.recent_hashes(2) == block_hashes(tokens, BS16)[::-1][:2]  # most recent first, bounded
    bm.check_invariants()


def test_prefix_policy_prefers_the_cached_node_until_load_outweighs_it():
    tokens = list(range(8 * BS16))
    hashes = block_hashes(tokens, BS16)
    cold, warm = node("p-cold"), node("p-warm", prefix_hashes=hashes[:6])
    prefill = Policy("prefix", "prefill", BS16)
    assert prefill.pick([cold, warm], hashes, len(tokens)) == Choice(warm, 6 * BS16)
    warm.pending_prompt_tokens = 6 * BS16 + 1  # more queued work than the cache saves
    assert prefill.pick([cold, warm], hashes, len(tokens)).node is cold
    decode = Policy("prefix", "decode", BS16)
    assert decode.pick([cold, warm], hashes, len(tokens)).node is warm
    warm.active = 1 + 6 * BS16 // DECODE_REQUEST_TOKENS
    assert decode.pick([cold, warm], hashes, len(tokens)).node is cold
    # equal cost: the node with more free blocks (placements since the last poll reserved some)
    x, y = node("x"), node("y")
    x.pending_blocks = 4
    assert decode.pick([x, y], [], 10).node is y
    # a broken chain counts only its leading blocks
    gap = node("p-gap", prefix_hashes=[hashes[0], hashes[2], hashes[3]])
    assert prefill.pick([gap], hashes, len(tokens)).cached_tokens == BS16


def test_least_load_round_robin_and_exclusions():
    a, b, c = node("a", num_running=3), node("b", num_running=1), node("c", num_running=2)
    least = Policy("least-load", "decode", BS16)
    assert least.pick([a, b, c], [], 10).node is b
    b.active = 5  # placed since the last report: counted at once
    assert least.pick([a, b, c], [], 10).node is c
    rr = Policy("round-robin", "decode", BS16)
    assert [rr.pick([a, b, c], [], 10).node.node_id for _ in range(4)] == ["a", "b", "c", "a"]
    down, draining, full = node("d", healthy=False), node("e", draining=True), node("f", free_blocks=2)
    assert least.pick([down, draining, full], [], 10, need_blocks=3) is None
    assert least.pick([a, b, c], [], 10, exclude={"c", "a"}).node is b
    with pytest.raises(ValueError, match="policy must be one of"):
        Policy("random", "decode", BS16)
    b.latency_s = 1.0  # its polls answer slowly: placed on only when no prompt node can take the work
    assert least.pick([b, c], [], 10).node is c and least.pick([b], [], 10).node is b


def test_placement_metrics_exposition():
    from prometheus_client import CollectorRegistry, generate_latest

    from router.policy import PlacementCollector

    stats = PlacementStats(prefills_skipped=3, failovers=2)
    stats.placed(Choice(node("prefill-0"), 48))
    stats.placed(Choice(node("prefill-0"), 0))
    registry = CollectorRegistry()
    registry.register(PlacementCollector(stats, "m", "pdserve:"))
    text = generate_latest(registry).decode()
    assert 'pdserve:placement_cached_tokens_total{model_name="m",node="prefill-0",role="router"} 48.0' in text
    assert 'pdserve:placement_prefills_skipped_total{model_name="m",role="router"} 3.0' in text
    assert 'pdserve:placement_failovers_total{model_name="m",role="router"} 2.0' in text


def test_local_prefill_threshold():
    placement = Placement(BS16, local_prefill_tokens=32)
    d = node("d")
    assert placement.prefill_locally(Choice(d, 100), 130)  # 30 uncached tokens
    assert not placement.prefill_locally(Choice(d, 100), 140)
    assert not Placement(BS16).prefill_locally(Choice(d, 100), 101)  # 0 = never
    assert not placement.prefill_locally(None, 10)
    with pytest.raises(ValueError):
        Placement(BS16, local_prefill_tokens=-1)


def test_local_prefill_default_is_the_measured_one():
    from router.__main__ import build_parser
    from router.policy import DEFAULT_LOCAL_PREFILL_TOKENS

    ns = build_parser().parse_args(["--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"])
    assert ns.local_prefill_tokens == DEFAULT_LOCAL_PREFILL_TOKENS == 64
    assert build_parser().parse_args(["--local-prefill-tokens", "0"]).local_prefill_tokens == 0
