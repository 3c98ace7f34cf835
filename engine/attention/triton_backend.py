"""Attention backend on the Triton kernels in `kernels/`.

A pure-decode step runs the decode kernel (split-KV chosen once per step in `plan`); any other
step runs the varlen prefill kernel over all rows, with its tile lists built once per step.
An fp8 cache is read by the same kernels (1-byte loads, converted in registers).
"""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from kernels.kv_cache_write import write_kv_cache
from kernels.paged_decode_attention import choose_num_splits, num_sms, paged_decode_attention
from kernels.paged_prefill_attention import paged_prefill_attention, plan_tiles


class TritonAttentionBackend(AttentionBackend):
    """Paged attention with Triton kernels (CUDA; CPU tensors only under TRITON_INTERPRET=1)."""

    name = "triton"
    cuda_graph_safe = True

    def plan(self, metadata: AttentionMetadata) -> None:
        super().plan(metadata)
        device = metadata.seq_lens.device
        group = self.num_heads // self.num_kv_heads
        self._num_splits = self._tiles = None
        self._num_tokens = sum(metadata.query_lens_cpu)
        if metadata.is_pure_decode:
            self._num_splits = choose_num_splits(
                metadata.num_seqs, self.num_kv_heads, metadata.max_seq_len, num_sms(device))
        else:
            self._tiles = plan_tiles(metadata.query_lens_cpu, group, device)

    def forward(self, q, k, v, k_cache, v_cache):
        md = self.metadata
        fp8 = k_cache.dtype == torch.float8_e4m3fn
        ks, vs = (self.k_scale, self.v_scale) if fp8 else (1.0, 1.0)
        write_kv_cache(k, v, k_cache, v_cache, md.slot_mapping, ks, vs)
        if self._tiles is not None:
            out = torch.empty_like(q) if q.shape[0] == self._num_tokens else torch.zeros_like(q)
            return paged_prefill_attention(
                q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, self.scale,
                md.max_query_len, out, tiles=self._tiles, k_scale=ks, v_scale=vs)
        n = md.num_seqs  # q may carry padding tokens past the last row: they get zeros
        out = torch.empty_like(q) if q.shape[0] == n else torch.zeros_like(q)
        paged_decode_attention(
            q[:n], k_cache, v_cache, md.block_tables, md.seq_lens, self.scale, out[:n],
            max_seq_len=md.max_seq_len, num_splits=self._num_splits, k_scale=ks, v_scale=vs)
        return out
