"""Block manager and scheduler: exact behaviour, and long randomized runs with invariants."""
from __future__ import annotations

import random

import pytest

from engine.block_manager import NULL_BLOCK_ID, BlockManager
from engine.config import SchedulerConfig
from engine.request import FinishReason, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def test_null_block_never_allocated():
    bm = BlockManager(num_blocks=5, block_size=4)
    got = bm.allocate(4)
    assert NULL_BLOCK_ID not in got and sorted(got) == [1, 2, 3, 4]
    assert not bm.can_allocate(1)
    bm.free(got)
    bm.check_invariants()
    assert bm.num_free_blocks == 4


def test_free_tail_first_keeps_prefix_longest():
    bm = BlockManager(num_blocks=6, block_size=2)
    table = bm.allocate(3)
    tokens = [1, 2, 3, 4, 5, 6]
    bm.cache_full_blocks(table, tokens, 6)
    bm.free(table)
    # The tail was freed first, so it is evicted first.
    assert list(bm.free_queue)[-3:] == list(reversed(table))
    assert bm.find_cached_prefix(tokens + [7]) == table


def test_prefix_lookup_needs_equal_tokens_and_chain():
    bm = BlockManager(num_blocks=8, block_size=2)
    t = bm.allocate(2)
    bm.cache_full_blocks(t, [1, 2, 3, 4], 4)
    assert bm.find_cached_prefix([1, 2, 3, 4, 9]) == t
    assert bm.find_cached_prefix([1, 2, 3, 5, 9]) == t[:1]
    assert bm.find_cached_prefix([9, 2, 3, 4, 9]) == []  # same second block, other parent
    assert bm.find_cached_prefix([1, 2, 3, 4]) == t[:1]  # never covers the last token
    bm.touch(t[:1])
    assert bm.blocks[t[0]].ref_count == 2
    bm.free(t[:1])
    bm.free(t)
    bm.check_invariants()


def test_eviction_drops_hash():
    bm = BlockManager(num_blocks=3, block_size=2)
    t = bm.allocate(2)
    bm.cache_full_blocks(t, [1, 2, 3, 4], 4)
    bm.free(t)
    bm.allocate(2)  # reuses both cached blocks
    assert bm.hash_to_block == {}
    assert bm.find_cached_prefix([1, 2, 3, 4, 5]) == []
    bm.check_invariants()


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=3, block_size=2)
    t = bm.allocate(1)
    bm.free(t)
    with pytest.raises(AssertionError, match="double free"):
        bm.free(t)


def test_randomized_block_manager():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    held: list[list[int]] = []
    vocab = 6  # small vocabulary so prefixes repeat and hit
    for step in range(5000):
        op = rng.random()
        if op < 0.45:
            tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
            hits = bm.find_cached_prefix(tokens)
            need = bm.blocks_needed(len(tokens)) - len(hits)
            bm.touch(hits)
            if bm.can_allocate(need):
                table = hits + bm.allocate(need)
                bm.cache_full_blocks(table, tokens, len(tokens))
                held.append(table)
            else:
                bm.free(hits)
        elif held:
            bm.free(held.pop(rng.randrange(len(held))))
        bm.check_invariants()
    for table in held:
        bm.free(table)
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_total_blocks
    assert bm.prefix_hits > 0


def test_randomized_scheduler_run():
    """Schedule / fake-execute / update for thousands of steps with random arrivals, aborts and
    a cache small enough to preempt; invariants after every step, nothing leaked at the end."""
    rng = random.Random(1)
    bm = BlockManager(num_blocks=40, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24, max_model_len=64), bm)
    live: dict[str, Request] = {}
    params = SamplingParams(max_tokens=30)
    done = 0
    for step in range(3000):
        if rng.random() < 0.3 and len(live) < 20:
            rid = f"r{step}"
            prompt = [rng.randrange(5) for _ in range(rng.randint(1, 30))]
            req = Request(rid, prompt, params, max_tokens=rng.randint(1, 30), priority=rng.randint(0, 2))
            live[rid] = req
            sched.add_request(req)
        if live and rng.random() < 0.03:
            rid = rng.choice(list(live))
            sched.finish(live.pop(rid), FinishReason.ABORTED)
        out = sched.schedule()
        assert out.num_scheduled_tokens <= 24 and len(out.chunks) <= 8
        for chunk in out.chunks:
            assert chunk.request.request_id not in out.preempted_ids
            assert len(chunk.block_table) * 4 >= chunk.end_pos
            sched.advance(chunk)
            req = chunk.request
            if chunk.sample:
                req.output_token_ids.append(rng.randrange(5))
                if req.num_output_tokens >= req.max_tokens:
                    sched.finish(req, FinishReason.LENGTH)
                    live.pop(req.request_id)
                    done += 1
        sched.check_invariants()
    for req in list(live.values()):
        sched.finish(req, FinishReason.ABORTED)
    sched.check_invariants()
    assert bm.num_free_blocks == bm.num_total_blocks
    assert done > 100 and sched.num_preemptions > 0
