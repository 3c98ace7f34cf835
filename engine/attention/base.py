"""Attention backend interface.

One `AttentionMetadata` is built per step by the model runner; the backend's `plan()` sees it
once, then `forward()` runs once per layer. Every row of a step (decode rows have one query token,
prefill rows a chunk of the prompt) is handled the same way:

    1. the step's new K/V are written into the paged cache at `slot_mapping`;
    2. the queries of row b are the last `q_len_b` positions of a context of `seq_lens[b]` tokens,
       and attend causally to that whole context, read back from the paged cache through
       `block_tables[b]`.

Cache layout per layer: K and V each `[num_blocks, block_size, num_kv_heads, head_dim]`;
block 0 is the null block (never written by a real token). The cache is in the model's dtype, or
float8 e4m3fn (`--kv-cache-dtype fp8`): then it holds `k / k_scale` and `v / v_scale`, saturated at
+-448, and attention reads `stored * scale` (static per-tensor scales, `set_kv_scales`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64; block_id * block_size + offset; < 0 = padding
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32; cu_seqlens_q
    seq_lens: torch.Tensor  # [num_seqs] int32; context length of each row after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32; padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies (lists of ints) for backends that loop on the CPU.
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Computes attention over the paged KV cache for one step's batch."""

    name: str = "abstract"
    # forward() of a pure-decode step makes no host syncs and no plan-dependent host work, so a
    # CUDA graph may capture it (planned once with a bound on the context).
    cuda_graph_safe: bool = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_scale = 1.0  # an fp8 cache's dequantization scales (unused by a dense cache)
        self.v_scale = 1.0
        self.metadata: AttentionMetadata | None = None

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        """The static scales of an fp8 cache (stored = x / scale); 1.0 as vLLM's default. Set them
        before the cache is written and before CUDA graphs are captured (a graph keeps the scales
        it was captured with); both sides of a KV transfer need the same ones."""
        if not (k_scale > 0 and v_scale > 0):
            raise ValueError(f"KV scales must be positive, got k {k_scale}, v {v_scale}")
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)

    def plan(self, metadata: AttentionMetadata) -> None:
        """Called once per step before the forward pass."""
        self.metadata = metadata

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write k/v into the cache at the planned slots, then attend."""
