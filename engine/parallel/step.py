"""Rank 0 drives the other ranks of a tensor-parallel group, one command at a time.

Every command starts with a fixed header broadcast from rank 0: HEADER_LEN int64 values,
`[command, arg0, arg1, ...]`; the tensors that follow have the sizes the header declares (never
pickle, never object collectives). Each rank then runs the same collectives in the same order.

    STEP n_tokens n_seqs width n_sampled graph   ids, positions, slots [n_tokens], query_start_loc
                                                 [n_seqs+1], seq_lens [n_seqs], block_tables
                                                 [n_seqs, width], logits_indices [n_sampled];
                                                 then the forward pass (graph > 0: replay that graph)
    ALLOCATE n_blocks                            KV cache of n_blocks blocks (this rank's heads)
    CAPTURE                                      capture the decode CUDA graphs (NCCL inside)
    READ n                                       block ids [n]; each rank's K, V gathered to rank 0
    WRITE n                                      block ids [n]; K, V heads scattered from rank 0
    STOP                                         the worker returns
"""
from __future__ import annotations

import enum
import logging

import torch

from engine.model_runner import ModelRunner, _Filled, check_kv_dtype
from engine.parallel.group import TPGroup

logger = logging.getLogger("pdserve.engine")

HEADER_LEN = 8


class Command(enum.IntEnum):
    STEP = 1
    ALLOCATE = 2
    CAPTURE = 3
    READ = 4
    WRITE = 5
    STOP = 6


def _step_tensors(runner: ModelRunner, n_tokens: int, n_seqs: int, n_sampled: int) -> list[torch.Tensor]:
    """The runner's device buffers a STEP fills, in broadcast order (block tables go apart)."""
    b = runner.buffers
    return [b.ids_d[:n_tokens], b.pos_d[:n_tokens], b.slots_d[:n_tokens], b.qsl_d[:n_seqs + 1],
            b.lens_d[:n_seqs], b.logits_idx_d[:n_sampled]]


class TPLeaderRunner(ModelRunner):
    """Rank 0's model runner: the scheduler's runner, which also sends every command to the
    other ranks. KV export and import see full-head tensors: `read_blocks` gathers every rank's
    heads, `write_blocks` scatters them, so KV transports do not know about TP."""

    def __init__(self, *args, group: TPGroup, kv_starts: list[int], total_kv_heads: int, **kwargs):
        self.group = group
        self.kv_starts = kv_starts  # first KV head of every rank
        self.total_kv_heads = total_kv_heads
        super().__init__(*args, **kwargs)

    def _command(self, command: Command, *args: int) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = int(command)
        header[1:1 + len(args)] = torch.tensor(args, dtype=torch.int64)
        self.group.broadcast(header.to(self.group.device))

    def publish_step(self, num_tokens: int, num_seqs: int, filled: _Filled, graph_size: int) -> None:
        n_sampled, width = filled.num_logits, filled.table_width  # logits rows: sampled + prompt logprobs
        self._command(Command.STEP, num_tokens, num_seqs, width, n_sampled, graph_size)
        for t in _step_tensors(self, num_tokens, num_seqs, n_sampled):
            if t.numel():
                self.group.broadcast(t)
        if width:
            self.group.broadcast(self.buffers.tables_d[:num_seqs, :width].contiguous())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._command(Command.ALLOCATE, num_blocks)
        super().allocate_kv_cache(num_blocks)

    def capture_cuda_graphs(self) -> None:
        if self.graph_max_batch and self.kv_caches:
            self._command(Command.CAPTURE)
        super().capture_cuda_graphs()

    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids` with every KV head: `[layers, n, block_size, kv_heads, head_dim]`."""
        self._command(Command.READ, len(block_ids))
        self.group.broadcast(torch.tensor(block_ids, dtype=torch.int64, device=self.group.device))
        k, v = super().read_blocks(block_ids)  # an fp8 cache's blocks travel as their bytes (_wire)
        return (self._full_heads(self.group.gather(_wire(k))).view(k.dtype),
                self._full_heads(self.group.gather(_wire(v))).view(v.dtype))

    def _full_heads(self, per_rank: list[torch.Tensor]) -> torch.Tensor:
        """One copy of each KV head, in head order (replicated heads come from their first rank)."""
        first = {start: r for r, start in reversed(list(enumerate(self.kv_starts)))}
        return torch.cat([per_rank[first[s]] for s in sorted(first)], dim=3)

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        s = self.shape
        expected = (s.num_layers, len(block_ids), self.block_size, self.total_kv_heads, s.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KV shape {tuple(k.shape)} does not match the cache {expected}")
        check_kv_dtype(k, v, self.kv_dtype)
        self._command(Command.WRITE, len(block_ids))
        self.group.broadcast(torch.tensor(block_ids, dtype=torch.int64, device=self.group.device))
        local = (s.num_layers, len(block_ids), self.block_size, s.num_kv_heads, s.head_dim)
        mine = [torch.empty(local, dtype=self.kv_dtype, device=self.device) for _ in range(2)]
        for out, x in zip(mine, (k, v)):
            self.group.scatter(_wire(out), [_wire(c) for c in self._split_heads(x)])
        super().write_blocks(block_ids, *mine)

    def _split_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.to(device=self.device, dtype=self.kv_dtype)
        n = self.shape.num_kv_heads
        return [x[:, :, :, start:start + n] for start in self.kv_starts]

    def stop_ranks(self) -> None:
        """Tells the other ranks to return (they exit once their process ends)."""
        self._command(Command.STOP)


class TPFollower:
    """Ranks 1..N-1: run rank 0's commands on this rank's shard until STOP."""

    def __init__(self, runner: ModelRunner, group: TPGroup):
        self.runner = runner
        self.group = group

    def serve(self) -> None:
        r = self.runner
        handlers = {
            Command.STEP: lambda a: self._step(*a[:5]),
            Command.ALLOCATE: lambda a: r.allocate_kv_cache(a[0]),
            Command.CAPTURE: lambda a: r.capture_cuda_graphs(),
            Command.READ: lambda a: self._read(a[0]),
            Command.WRITE: lambda a: self._write(a[0]),
        }
        while True:
            header = self.group.broadcast(torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.group.device))
            command, *args = header.tolist()
            if command == Command.STOP:
                return
            with torch.inference_mode():
                handlers[Command(command)](args)

    def _step(self, n_tokens: int, n_seqs: int, width: int, n_sampled: int, graph_size: int) -> None:
        r, g = self.runner, self.group
        for t in _step_tensors(r, n_tokens, n_seqs, n_sampled):
            if t.numel():
                g.broadcast(t)
        if width:
            tables = g.broadcast(torch.empty((n_seqs, width), dtype=torch.int32, device=r.device))
            r.buffers.tables_d[:n_seqs, :width].copy_(tables)
        if graph_size:
            r.graphs.graphs[graph_size][0].replay()
            return
        starts = r.buffers.qsl_d[:n_seqs + 1].tolist()
        query_lens = tuple(b - a for a, b in zip(starts, starts[1:]))
        seq_lens = tuple(r.buffers.lens_d[:n_seqs].tolist())
        r.forward(r.staged_inputs(n_tokens, width, tuple(range(n_sampled)), query_lens, seq_lens))

    def _block_ids(self, n: int) -> list[int]:
        return self.group.broadcast(torch.empty(n, dtype=torch.int64, device=self.group.device)).tolist()

    def _read(self, n: int) -> None:
        k, v = self.runner.read_blocks(self._block_ids(n))
        self.group.gather(_wire(k))
        self.group.gather(_wire(v))

    def _write(self, n: int) -> None:
        ids = self._block_ids(n)
        s, r = self.runner.shape, self.runner
        local = (s.num_layers, n, r.block_size, s.num_kv_heads, s.head_dim)
        k, v = [torch.empty(local, dtype=r.kv_dtype, device=r.device) for _ in range(2)]
        for out in (k, v):
            self.group.scatter(_wire(out))
        r.write_blocks(ids, k, v)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """An fp8 KV tensor as its bytes for gloo / NCCL collectives (which take no float8); others
    as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
