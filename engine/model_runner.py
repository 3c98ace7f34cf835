"""Model runner: turns a `SchedulerOutput` into one forward pass and one batched sample.

It owns the model, the paged KV cache (one K and one V tensor per layer shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`) and the attention backend. It never reaches
into the scheduler: everything it needs comes in the `SchedulerOutput`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, get_backend_class
from engine.config import ModelShape
from engine.sampler import RowSpec, Sampler, SamplerOutput, SamplingMetadata
from engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64; last token of each sampled row
    sampled_rows: tuple[int, ...]  # row index (into chunks) of each sampled row


class ModelRunner:
    def __init__(self, model: torch.nn.Module, shape: ModelShape, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, backend_name: str):
        self.model = model
        self.shape = shape
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.dtype = dtype
        cache_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        self.kv_caches = [
            (torch.zeros(cache_shape, dtype=dtype, device=device), torch.zeros(cache_shape, dtype=dtype, device=device))
            for _ in range(shape.num_layers)
        ]
        backend_cls = get_backend_class(backend_name)
        self.attn = backend_cls(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5)
        self.sampler = Sampler()

    # ---- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, rows: list[RowSpec]) -> SamplerOutput | None:
        """Runs the step; samples one token for every chunk with `sample` set (`rows` gives their
        sampling state, in chunk order)."""
        inputs = self.prepare_inputs(out)
        self.attn.plan(inputs.metadata)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, self.attn)
        if not inputs.sampled_rows:
            return None
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        meta = SamplingMetadata.build(rows, self.shape.vocab_size, self.device)
        return self.sampler(logits, meta)

    def prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        sampled_rows: list[int] = []
        max_blocks = max(len(c.block_table) for c in out.chunks)
        tables = []
        for i, chunk in enumerate(out.chunks):
            table = chunk.block_table
            input_ids.extend(chunk.token_ids)
            pos = range(chunk.start_pos, chunk.end_pos)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            query_start.append(query_start[-1] + len(chunk.token_ids))
            seq_lens.append(chunk.end_pos)
            tables.append(list(table) + [0] * (max_blocks - len(table)))
            if chunk.sample:
                logits_indices.append(query_start[-1] - 1)
                sampled_rows.append(i)
        dev = self.device
        query_lens = tuple(b - a for a, b in zip(query_start, query_start[1:]))
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=tuple(seq_lens),
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            metadata=md,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=dev),
            sampled_rows=tuple(sampled_rows),
        )

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
