"""Model runner: turns a `SchedulerOutput` into one forward pass and one batched sample.

It owns the model, the paged KV cache (one K and one V tensor per layer shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`) and the attention backend. It never reaches
into the scheduler: everything it needs comes in the `SchedulerOutput`.

Step inputs live in persistent buffers: the host fills pinned staging arrays (numpy views, no
per-step allocation) and one non-blocking copy per tensor moves them to the device. On CUDA, a
step whose rows all decode one token replays a CUDA graph captured for the next padded batch
size (`CudaGraphs`): the whole forward pass plus the LM head is one launch, which is what keeps
a small model (or batch 1 of a large one) from being bound by kernel launches.
"""
from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import AttentionMetadata, get_backend_class
from engine.config import ModelShape
from engine.sampler import RowSpec, Sampler, SamplerOutput, SamplingMetadata
from engine.scheduler import SchedulerOutput

logger = logging.getLogger("pdserve.engine")


def cuda_graph_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8 up to `max_batch` (and it)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64; last token of each sampled row
    sampled_rows: tuple[int, ...]  # row index (into chunks) of each sampled row


class _Buffers:
    """Persistent step inputs: pinned host staging (numpy views) and their device twins."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks

        def pair(shape, dtype):
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            dev = torch.zeros(shape, dtype=dtype, device=device) if pin else host
            return host, host.numpy(), dev

        self.ids_h, self.ids, self.ids_d = pair(max_tokens, torch.int64)
        self.pos_h, self.pos, self.pos_d = pair(max_tokens, torch.int64)
        self.slots_h, self.slots, self.slots_d = pair(max_tokens, torch.int64)
        self.qsl_h, self.qsl, self.qsl_d = pair(max_seqs + 1, torch.int32)
        self.lens_h, self.lens, self.lens_d = pair(max_seqs, torch.int32)
        self.tables_h, self.tables, self.tables_d = pair((max_seqs, max_blocks), torch.int32)
        self.logits_idx_h, self.logits_idx, self.logits_idx_d = pair(max_seqs, torch.int64)

    def upload(self, num_tokens: int, num_seqs: int, table_width: int, num_sampled: int) -> None:
        if self.device.type != "cuda":
            return  # host and device buffers are the same tensors
        for h, d, n in ((self.ids_h, self.ids_d, num_tokens), (self.pos_h, self.pos_d, num_tokens),
                        (self.slots_h, self.slots_d, num_tokens), (self.qsl_h, self.qsl_d, num_seqs + 1),
                        (self.lens_h, self.lens_d, num_seqs), (self.logits_idx_h, self.logits_idx_d, num_sampled)):
            d[:n].copy_(h[:n], non_blocking=True)
        self.tables_d[:num_seqs, :table_width].copy_(self.tables_h[:num_seqs, :table_width], non_blocking=True)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, shape: ModelShape, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, backend_name: str, *,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, enforce_eager: bool = False):
        self.model = model
        self.shape = shape
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        backend_cls = get_backend_class(backend_name)
        self.attn = backend_cls(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5)
        self.sampler = Sampler()
        self.max_blocks_per_seq = -(-shape.max_position_embeddings // block_size)
        self.graph_max_batch = 0 if enforce_eager or device.type != "cuda" else min(max_num_seqs, 512)
        self.buffers = _Buffers(max(max_num_batched_tokens, self.graph_max_batch, 1),
                                max(max_num_seqs, self.graph_max_batch, 1), self.max_blocks_per_seq, device)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs: CudaGraphs | None = None
        if num_blocks:
            self.allocate_kv_cache(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = self.shape
        cache_shape = (num_blocks, self.block_size, shape.num_kv_heads, shape.head_dim)
        self.kv_caches = []
        self.kv_caches = [
            (torch.zeros(cache_shape, dtype=self.dtype, device=self.device),
             torch.zeros(cache_shape, dtype=self.dtype, device=self.device))
            for _ in range(shape.num_layers)
        ]
        self.num_blocks = num_blocks

    def capture_cuda_graphs(self) -> None:
        """Captures the decode graphs (CUDA, unless enforce_eager); needs the KV cache."""
        if self.graph_max_batch and self.kv_caches:
            self.graphs = CudaGraphs(self, cuda_graph_sizes(self.graph_max_batch))

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, rows: list[RowSpec]) -> SamplerOutput | None:
        """Runs the step; samples one token for every chunk with `sample` set (`rows` gives their
        sampling state, in chunk order)."""
        chunks = out.chunks
        if (self.graphs is not None and len(chunks) <= self.graphs.max_batch
                and out.num_scheduled_tokens == len(chunks) and all(c.sample for c in chunks)):
            logits = self.graphs.run(out)  # one token per row, every row sampled
        else:
            inputs = self.prepare_inputs(out)
            self.attn.plan(inputs.metadata)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, self.attn)
            if not inputs.sampled_rows:
                return None
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        meta = SamplingMetadata.build(rows, self.shape.vocab_size, self.device)
        return self.sampler(logits, meta)

    def fill_rows(self, out: SchedulerOutput) -> tuple[int, int, int, list[int]]:
        """Writes the step's rows into the host staging buffers; returns (num_tokens, table
        width, num_sampled, sampled row indices)."""
        b = self.buffers
        bs = self.block_size
        ids, pos, slots, qsl, lens, tables, logits_idx = b.ids, b.pos, b.slots, b.qsl, b.lens, b.tables, b.logits_idx
        t = 0
        width = 0
        sampled: list[int] = []
        qsl[0] = 0
        for i, chunk in enumerate(out.chunks):
            table = chunk.block_table
            start, n = chunk.start_pos, len(chunk.token_ids)
            end = start + n
            if n == 1:
                ids[t] = chunk.token_ids[0]
                pos[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                ids[t:t + n] = chunk.token_ids
                p = np.arange(start, end)
                pos[t:t + n] = p
                slots[t:t + n] = np.asarray(table)[p // bs] * bs + p % bs
            t += n
            qsl[i + 1] = t
            lens[i] = end
            used = -(-end // bs)
            tables[i, :used] = table[:used]
            width = max(width, used)
            if chunk.sample:
                logits_idx[len(sampled)] = t - 1
                sampled.append(i)
        return t, width, len(sampled), sampled

    def prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        b = self.buffers
        num_seqs = len(out.chunks)
        num_tokens, width, num_sampled, sampled = self.fill_rows(out)
        b.upload(num_tokens, num_seqs, width, num_sampled)
        query_lens = tuple(len(c.token_ids) for c in out.chunks)
        seq_lens = tuple(c.end_pos for c in out.chunks)
        md = AttentionMetadata(
            slot_mapping=b.slots_d[:num_tokens],
            query_start_loc=b.qsl_d[:num_seqs + 1],
            seq_lens=b.lens_d[:num_seqs],
            block_tables=b.tables_d[:num_seqs, :max(width, 1)],
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=b.ids_d[:num_tokens],
            positions=b.pos_d[:num_tokens],
            metadata=md,
            logits_indices=b.logits_idx_d[:num_sampled],
            sampled_rows=tuple(sampled),
        )

    # ---- memory profile ----------------------------------------------------------------------
    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, num_seqs: int, max_model_len: int) -> int:
        """Bytes of activation memory the largest step needs beyond the weights: one forward of
        `num_tokens` tokens in `num_seqs` rows (each at most max_model_len), all rows sampled with
        top-p (the sampler's heaviest path). Runs on a scratch KV cache, freed afterwards."""
        from engine.sampling_params import SamplingParams

        bs = self.block_size
        num_seqs = max(1, min(num_seqs, num_tokens))
        per_row = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        per_row = [min(n, max_model_len - 1) for n in per_row if n > 0]
        need = sum(-(-n // bs) for n in per_row) + 1
        saved = (self.kv_caches, self.num_blocks)
        self.allocate_kv_cache(need)
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            from engine.scheduler import ScheduledChunk
            chunks, next_block = [], 1
            for n in per_row:
                k = -(-n // bs)
                chunks.append(ScheduledChunk(None, tuple([1] * n), 0, tuple(range(next_block, next_block + k)), True))
                next_block += k
            params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, logprobs=5)
            rows = [RowSpec(params, (1,), ()) for _ in chunks]
            saved_graphs, self.graphs = self.graphs, None
            try:
                self.execute(SchedulerOutput(tuple(chunks)), rows)
            finally:
                self.graphs = saved_graphs
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        finally:
            self.kv_caches, self.num_blocks = [], 0
            torch.cuda.empty_cache()
            self.kv_caches, self.num_blocks = saved

    # ---- KV export / import (prefill and decode roles) ---------------------------------------
    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `block_ids`, each `[num_layers, len(block_ids), block_size, kv_heads, head_dim]`."""
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        k = torch.stack([kc.index_select(0, idx) for kc, _ in self.kv_caches])
        v = torch.stack([vc.index_select(0, idx) for _, vc in self.kv_caches])
        return k, v

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        expected = (self.shape.num_layers, len(block_ids), self.block_size, self.shape.num_kv_heads, self.shape.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"KV shape {tuple(k.shape)} does not match the cache {expected}")
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        for layer, (kc, vc) in enumerate(self.kv_caches):
            kc.index_copy_(0, idx, k[layer].to(device=self.device, dtype=self.dtype))
            vc.index_copy_(0, idx, v[layer].to(device=self.device, dtype=self.dtype))


class CudaGraphs:
    """One CUDA graph per padded batch size for pure-decode steps: embedding -> layers -> norm ->
    LM head, reading the runner's persistent device buffers.

    Padding rows (batch n < graph size) get slot -1 (no KV write) and seq_len 0 (attention
    returns zeros); their logits are ignored. The attention backend is planned once per graph
    with a bound on the context (max_model_len), so the launch parameters baked into a graph
    hold for any context; the decode kernel splits each sequence's own context.
    """

    def __init__(self, runner: ModelRunner, sizes: list[int]):
        self.runner = runner
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        t0 = time.perf_counter()
        before = torch.cuda.mem_get_info(runner.device)[0]
        pool = torch.cuda.graph_pool_handle()
        b = runner.buffers
        b.slots_d.fill_(-1)
        b.lens_d.zero_()
        b.ids_d.zero_()
        b.pos_d.zero_()
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the others reuse its pool memory
                self.runner.attn.plan(self._metadata(size))
                for _ in range(2):  # compile / autotune outside the capture
                    self._forward(size)
                torch.cuda.synchronize(runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(size)
                self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(runner.device)
        used = before - torch.cuda.mem_get_info(runner.device)[0]
        logger.info("captured %d CUDA graphs (batch 1..%d) in %.1f s, %.0f MiB", len(self.sizes),
                    self.max_batch, time.perf_counter() - t0, used / 2**20)

    def _metadata(self, size: int) -> AttentionMetadata:
        b, r = self.runner.buffers, self.runner
        return AttentionMetadata(
            slot_mapping=b.slots_d[:size], query_start_loc=b.qsl_d[:size + 1], seq_lens=b.lens_d[:size],
            block_tables=b.tables_d[:size], max_query_len=1, max_seq_len=r.shape.max_position_embeddings,
            query_lens_cpu=(1,) * size, seq_lens_cpu=(r.shape.max_position_embeddings,) * size)

    def _forward(self, size: int) -> torch.Tensor:
        r, b = self.runner, self.runner.buffers
        hidden = r.model(b.ids_d[:size], b.pos_d[:size], r.kv_caches, r.attn)
        return r.model.compute_logits(hidden)

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits `[n, vocab]` of a pure-decode step of n rows."""
        r, b = self.runner, self.runner.buffers
        n = len(out.chunks)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        _, width, _, _ = r.fill_rows(out)
        if size > n:  # padding rows
            b.ids[n:size] = 0
            b.pos[n:size] = 0
            b.slots[n:size] = -1
            b.lens[n:size] = 0
        b.upload(size, size, width, 0)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:n]
