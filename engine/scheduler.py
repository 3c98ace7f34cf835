"""Continuous-batching scheduler with chunked prefill, prefix caching and preemption by recompute.

Each step hands out a token budget. Running requests go first (a decode row costs one token, an
unfinished prefill costs the rest of its prompt up to the budget), then waiting requests are
admitted in (priority, arrival) order while the budget, `max_num_seqs` and free blocks allow.
When a running request needs a block and none is free, the lowest-priority, latest request is
preempted: its blocks are freed and it recomputes from scratch later (its output is kept).
Prompt logprobs need the full logits of every prompt position; a step computes at most
PROMPT_LOGITS_PER_STEP of them (a request asking for them prefills in chunks of at most that), so
their memory is bounded and measured by the KV sizing profile whatever the token budget.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.request import PLACEHOLDER, FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """One row of a step: compute KV for `token_ids` at positions `start_pos ...`."""

    request: Request  # the scheduler's and the engine's handle: the model runner never reads it
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    sample: bool  # the chunk reaches the request's last known token: sample the next one
    # prompt logprobs: (first position, count) of the positions whose full logits are needed, the
    # prompt tokens those positions predict, and how many top candidates to report for each
    prompt_logits: tuple[int, int] = (0, 0)
    prompt_targets: tuple[int, ...] = ()
    num_prompt_top: int = 0
    # async scheduling: token_ids is (PLACEHOLDER,), the token that this row of the step in flight
    # samples (read from its device output); -1 otherwise
    input_row: int = -1

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """The only thing the scheduler hands to the model runner."""

    chunks: tuple[ScheduledChunk, ...]
    preempted_ids: tuple[str, ...] = ()

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


_order = itertools.count()
PROMPT_LOGITS_PER_STEP = 512  # prompt positions whose full logits one step computes (prompt logprobs)


@dataclass
class Scheduler:
    config: SchedulerConfig
    block_manager: BlockManager
    waiting: list[Request] = field(default_factory=list)  # sorted by (priority, arrival)
    running: list[Request] = field(default_factory=list)  # sorted likewise: victims come from the tail
    num_preemptions: int = 0
    _seq: dict[str, int] = field(default_factory=dict)
    _logit_room: int = PROMPT_LOGITS_PER_STEP  # of the step being scheduled

    # ---- queue management -----------------------------------------------------------------
    def _key(self, req: Request) -> tuple:
        return (req.priority, req.arrival_time, self._seq[req.request_id])

    def add_request(self, req: Request) -> None:
        assert req.request_id not in self._seq, f"duplicate request id {req.request_id!r}"
        self._seq[req.request_id] = next(_order)
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=self._key)

    def _add_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        bisect.insort(self.running, req, key=self._key)

    def add_running(self, req: Request) -> None:
        """Adds a request whose blocks are already allocated and filled (decode role import)."""
        assert req.request_id not in self._seq, f"duplicate request id {req.request_id!r}"
        self._seq[req.request_id] = next(_order)
        self._add_running(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- scheduling -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        self._logit_room = PROMPT_LOGITS_PER_STEP
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_output_tokens >= req.max_tokens or req.num_tokens == req.num_computed_tokens:
                i += 1  # its last token is in flight (async scheduling): nothing to compute
                continue
            n = self._capped(req, min(req.num_tokens - req.num_computed_tokens, budget))
            if n == 0:  # prompt logits: this step has no room left for them
                i += 1
                continue
            if self._make_room(req, n, preempted):
                chunks.append(self._chunk(req, n))
                budget -= n
                i += 1
            # else `req` itself was preempted; everything after it is gone too
        if not preempted:
            self._admit_waiting(chunks, budget)
        return SchedulerOutput(tuple(chunks), tuple(r.request_id for r in preempted))

    def _capped(self, req: Request, n: int) -> int:
        """`n` tokens of `req`, at most the step's prompt-logits room left if it needs prompt
        logits (taken from that room). Without chunked prefill a prompt runs whole."""
        if not req.needs_prompt_logits or not self.config.enable_chunked_prefill:
            return n
        n = min(n, self._logit_room)
        self._logit_room -= n
        return n

    def _make_room(self, req: Request, n: int, preempted: list[Request]) -> bool:
        while not self._allocate(req, n):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, chunks: list[ScheduledChunk], budget: int) -> None:
        bm = self.block_manager
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if req.parent is not None and not self._parent_ready(req):
                continue
            if req.num_pending:  # preempted with a token still in flight: wait for it
                continue
            shared = self._shared_prefix(req) if not req.block_table else []
            bm.touch(shared)
            num_computed = max(req.num_computed_tokens, len(shared) * bm.block_size)
            n = req.num_tokens - num_computed
            if not self.config.enable_chunked_prefill and n > budget:
                bm.free(shared)
                break
            n = self._capped(req, min(n, budget))
            if n == 0:  # prompt logits: this step has no room left for them
                bm.free(shared)
                continue
            need = bm.blocks_needed(num_computed + n) - len(req.block_table) - len(shared)
            if not bm.can_allocate(need):
                bm.free(shared)
                break
            req.block_table = req.block_table + shared + bm.allocate(need)
            req.num_computed_tokens = num_computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = len(shared) * bm.block_size
            self.waiting.remove(req)
            self._add_running(req)
            chunks.append(self._chunk(req, n))
            budget -= n

    def _parent_ready(self, req: Request) -> bool:
        parent = req.parent
        return parent.is_finished or parent.is_prefill_done

    def _shared_prefix(self, req: Request) -> list[int]:
        """Blocks this request can reuse: its n>1 parent's prompt blocks, else the prefix cache."""
        bm = self.block_manager
        parent = req.parent
        if parent is not None and parent.block_table and parent.is_prefill_done:
            full = (req.num_prompt_tokens - 1) // bm.block_size
            return list(parent.block_table[:full])
        if req.needs_prompt_logits:  # a cached block has no logits: compute the whole prompt
            return []
        return bm.find_cached_prefix(req.all_token_ids)

    def _allocate(self, req: Request, n: int) -> bool:
        bm = self.block_manager
        need = bm.blocks_needed(req.num_computed_tokens + n) - len(req.block_table)
        if need <= 0:
            return True
        if not bm.can_allocate(need):
            return False
        req.block_table.extend(bm.allocate(need))
        return True

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        tokens = tuple(req.token_id_at(j) for j in range(start, start + n))
        first, count = req.prompt_logits_span(start, start + n)
        targets = tuple(req.prompt_token_ids[first + 1:first + 1 + count])
        top = (req.sampling_params.prompt_logprobs or 0) if count else 0
        row = req.pending_row if n == 1 and tokens[0] == PLACEHOLDER else -1
        return ScheduledChunk(req, tokens, start, tuple(req.block_table), start + n == req.num_tokens,
                              (first, count), targets, top, row)

    @staticmethod
    def resolve_placeholders(out: SchedulerOutput) -> SchedulerOutput:
        """`out` with the placeholder tokens that became known on the host since it was scheduled
        (async scheduling: the step in flight was completed before this one launched)."""
        def known(c: ScheduledChunk) -> ScheduledChunk:
            token = c.request.token_id_at(c.start_pos) if c.input_row >= 0 else PLACEHOLDER
            return c if token == PLACEHOLDER else dataclasses.replace(c, token_ids=(token,), input_row=-1)

        return dataclasses.replace(out, chunks=tuple(known(c) for c in out.chunks))

    # ---- state changes --------------------------------------------------------------------
    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=self._key)

    def advance(self, chunk: ScheduledChunk, register: bool = True) -> None:
        """Marks a chunk's tokens as computed and (unless `register` is False: async scheduling
        registers once the step's tokens are known) registers newly full blocks in the prefix cache."""
        chunk.request.num_computed_tokens = chunk.end_pos
        if register:
            self.register_blocks(chunk)

    def register_blocks(self, chunk: ScheduledChunk) -> None:
        """Adds the blocks a computed chunk filled up to the prefix cache."""
        req = chunk.request
        bs = self.block_manager.block_size
        if chunk.end_pos // bs == chunk.start_pos // bs:  # no block filled up
            return
        if req.status != RequestStatus.RUNNING or len(req.block_table) * bs < chunk.end_pos:
            return  # preempted (or finished) since the chunk was scheduled
        self.block_manager.cache_full_blocks(req.block_table, req.all_token_ids, chunk.end_pos, req.block_hashes)

    def finish(self, req: Request, reason: FinishReason, free_blocks: bool = True) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        if req.finish_reason is None:
            req.finish_reason = reason
        self._seq.pop(req.request_id, None)
        if free_blocks:
            self.free_blocks(req)

    def free_blocks(self, req: Request) -> None:
        self.block_manager.free(req.block_table)
        req.block_table = []

    def check_invariants(self) -> None:
        self.block_manager.check_invariants()
        refs: dict[int, int] = {}
        for req in self.running:
            req.check_invariants(self.block_manager.block_size)
            for b in req.block_table:
                refs[b] = refs.get(b, 0) + 1
        for req in self.waiting:
            assert not req.block_table, f"waiting request {req.request_id} holds blocks"
        for b, count in refs.items():
            assert self.block_manager.blocks[b].ref_count >= count, (b, count)
