"""Paged KV block manager: pure Python, no torch, no I/O.

State is the blocks, a hash -> block map for prefix caching, a free queue in LRU order and the set
of blocks in use. Block 0 is the null block: never handed out, pads block tables.

Prefix caching: a full block is identified by a hash chained over every token before it
(`hash((parent_hash, tokens))`), so equal hashes mean equal prefixes; the tokens are kept too, so a
hash collision can never map a request onto foreign KV. A freed block keeps its hash and stays
findable until it is reused (LRU eviction from the front of the free queue).

    block_table:  [ b7 | b3 | b9 | b2 ]          request tokens: 0 .. num_tokens-1
                    full  full  full  partial   <- only full, computed blocks are hashed
"""
from __future__ import annotations

import itertools

from collections import OrderedDict
from dataclasses import dataclass, field

NULL_BLOCK_ID = 0
_NO_HASH = -1


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = _NO_HASH
    token_ids: tuple[int, ...] = ()


def chain_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chain hashes of every full block of `token_ids` (what the prefix cache registers)."""
    hashes, parent = [], _NO_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, tuple(token_ids[start:start + block_size]))
        hashes.append(parent)
    return hashes


@dataclass
class BlockManager:
    num_blocks: int  # including the null block
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    hash_to_block: dict[int, int] = field(init=False, default_factory=dict)
    free_queue: OrderedDict = field(init=False)  # block_id -> None; front = evicted first
    used: set[int] = field(init=False, default_factory=set)
    # Prefix-cache counters (queries and hits, in tokens), for metrics.
    prefix_queries: int = field(init=False, default=0)
    prefix_hits: int = field(init=False, default=0)

    def __post_init__(self):
        assert self.num_blocks >= 2 and self.block_size >= 1
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free_queue = OrderedDict((i, None) for i in range(1, self.num_blocks))

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        """Blocks a request can use (the null block excluded)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------
    def find_cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix of `token_ids`, never covering the last
        token (its logits must be computed)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = _NO_HASH
        bs = self.block_size
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            chunk = tuple(token_ids[start:start + bs])
            h = chain_hash(parent, chunk)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
            parent = h
        self.prefix_queries += len(token_ids)
        self.prefix_hits += len(hits) * bs
        return hits

    def cache_full_blocks(self, block_table: list[int], token_ids: list[int], num_computed: int,
                          hashes: list[int] | None = None) -> None:
        """Registers the hash of every full block whose KV is computed. `hashes`, when given, is
        the caller's memo of the chain hashes of `token_ids`' full blocks: extended here, so each
        block is hashed once in a request's life (tokens never change, so it survives preemption)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = num_computed // bs
        if hashes is None:
            hashes = []
        parent = hashes[-1] if hashes else _NO_HASH
        for i in range(len(hashes), num_full):
            parent = chain_hash(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            hashes.append(parent)
        for i in range(num_full):
            block = self.blocks[block_table[i]]
            h = hashes[i]
            if block.hash != _NO_HASH:  # written blocks are immutable; a hash never changes
                continue
            if h in self.hash_to_block:  # the same prefix cached elsewhere: keep the first
                continue
            block.hash, block.token_ids = h, tuple(token_ids[i * bs:(i + 1) * bs])
            self.hash_to_block[h] = block.block_id

    # ---- allocation -----------------------------------------------------------------------
    def can_allocate(self, num_new_blocks: int) -> bool:
        return num_new_blocks <= self.num_free_blocks

    def touch(self, block_ids: list[int]) -> None:
        """Takes a reference on blocks found in the prefix cache (or shared with a parent)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
                self.used.add(block_id)
            block.ref_count += 1

    def allocate(self, num_new_blocks: int) -> list[int]:
        assert self.can_allocate(num_new_blocks), (num_new_blocks, self.num_free_blocks)
        out = []
        for _ in range(num_new_blocks):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash != _NO_HASH:  # evict it from the prefix cache
                if self.hash_to_block.get(block.hash) == block_id:
                    del self.hash_to_block[block.hash]
                block.hash, block.token_ids = _NO_HASH, ()
            block.ref_count = 1
            self.used.add(block_id)
            out.append(block_id)
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drops one reference on each block, tail first, so a prefix outlives its tail in the
        LRU order."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.used.discard(block_id)
                self.free_queue[block_id] = None

    def recent_hashes(self, limit: int) -> list[int]:
        """Up to `limit` prefix-cache hashes, the most recently registered first (what a router
        needs to place a prompt where its prefix is cached; bounded, O(limit))."""
        return list(itertools.islice(reversed(self.hash_to_block), limit))

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.hash_to_block.values()):
            self.blocks[block_id].hash, self.blocks[block_id].token_ids = _NO_HASH, ()
        self.hash_to_block.clear()

    # ---- invariants -----------------------------------------------------------------------
    def check_invariants(self) -> None:
        null = self.blocks[NULL_BLOCK_ID]
        assert null.ref_count == 0 and NULL_BLOCK_ID not in self.free_queue and NULL_BLOCK_ID not in self.used
        assert len(self.free_queue) + len(self.used) == self.num_total_blocks
        for block in self.blocks[1:]:
            in_free = block.block_id in self.free_queue
            assert in_free != (block.block_id in self.used), f"block {block.block_id} free xor used"
            assert (block.ref_count == 0) == in_free, f"block {block.block_id} ref {block.ref_count}"
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h
