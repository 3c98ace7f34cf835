"""Reference attention backend in plain torch (CPU and GPU).

Decode rows (q_len 1) of a step are done together: one gather of their blocks
`k_cache[block_tables]` and a masked batched attention. Rows with more than one query token
(prefill chunks) are done one by one with `scaled_dot_product_attention` and a causal mask
shifted by the part of the context already cached.

Scores and outputs are computed in the input dtype, softmax in fp32 then cast back, as
HF transformers' eager attention does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata


@dataclass(frozen=True)
class _DecodeRows:
    rows: torch.Tensor  # [n] int64; row ids with q_len 1
    tokens: torch.Tensor  # [n] int64; their token index in q
    block_tables: torch.Tensor  # [n, max_blocks] int32
    seq_lens: torch.Tensor  # [n] int64
    max_seq_len: int


@dataclass(frozen=True)
class _PrefillRow:
    start: int  # first token in q
    q_len: int
    seq_len: int
    row: int


@dataclass(frozen=True)
class _StepPlan:
    write_tokens: torch.Tensor | None  # [m] int64 token ids with a real slot; None = all tokens
    write_slots: torch.Tensor  # [m] int64
    decode: _DecodeRows | None
    prefill: tuple[_PrefillRow, ...]
    all_decode: bool  # every row is a decode row (token b is row b)
    num_tokens: int  # real tokens of the step; q may have padding tokens after them


def plan_step(md: AttentionMetadata) -> _StepPlan:
    """Splits a step into the slots to write, the decode rows and the prefill rows."""
    slots = md.slot_mapping.long()
    valid = slots >= 0
    if bool(valid.all()):
        write_tokens, write_slots = None, slots
    else:
        write_tokens = valid.nonzero().squeeze(1)
        write_slots = slots[write_tokens]

    starts = [0]
    for q_len in md.query_lens_cpu:
        starts.append(starts[-1] + q_len)
    decode_rows = [b for b, q_len in enumerate(md.query_lens_cpu) if q_len == 1]
    prefill = tuple(
        _PrefillRow(starts[b], q_len, md.seq_lens_cpu[b], b)
        for b, q_len in enumerate(md.query_lens_cpu)
        if q_len > 1
    )
    decode = None
    if decode_rows:
        device = md.block_tables.device
        rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        tokens = torch.tensor([starts[b] for b in decode_rows], dtype=torch.long, device=device)
        decode = _DecodeRows(
            rows=rows,
            tokens=tokens,
            block_tables=md.block_tables[rows],
            seq_lens=md.seq_lens[rows].long(),
            max_seq_len=max(md.seq_lens_cpu[b] for b in decode_rows),
        )
    all_decode = len(decode_rows) == md.num_seqs and starts[-1] == md.num_seqs
    return _StepPlan(write_tokens, write_slots, decode, prefill, all_decode, starts[-1])


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    plan: _StepPlan,
) -> None:
    if plan.write_tokens is not None:
        k, v = k[plan.write_tokens], v[plan.write_tokens]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, plan.write_slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, plan.write_slots, v.to(v_cache.dtype))


def decode_attention(
    q: torch.Tensor,  # [n, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    rows: _DecodeRows,
    scale: float,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    n, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    num_blocks = -(-rows.max_seq_len // block_size)
    table = rows.block_tables[:, :num_blocks].long()
    ctx = num_blocks * block_size
    # [n, ctx, kv, d] -> [n, kv, d, ctx] / [n, kv, ctx, d]
    k = k_cache[table].view(n, ctx, num_kv_heads, head_dim).permute(0, 2, 3, 1)
    pos = torch.arange(ctx, device=q.device)
    masked = pos[None, :] >= rows.seq_lens[:, None]  # [n, ctx]
    # Slots past the end hold whatever the cache held (maybe NaN): zero them so 0 * v stays 0.
    v = v_cache[table].view(n, ctx, num_kv_heads, head_dim).masked_fill_(masked[:, :, None, None], 0)
    v = v.transpose(1, 2)
    qg = q.reshape(n, num_kv_heads, group, head_dim).to(k.dtype)
    scores = torch.matmul(qg, k) * scale  # [n, kv, group, ctx]
    scores = scores.masked_fill(masked.view(n, 1, 1, ctx), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).view(n, num_heads, head_dim).to(q.dtype)


def prefill_row_attention(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
    scale: float,
) -> torch.Tensor:  # [q_len, num_heads, head_dim]
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    blocks = block_table[: -(-seq_len // block_size)].long()
    k = k_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, kv, d]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, seq_len, d]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    # query i sits at position seq_len - q_len + i and sees keys 0 .. that position.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).to(k.dtype), k, v, attn_mask=allowed, scale=scale
    )
    return out.transpose(0, 1).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    """Plain-torch attention over the paged cache; runs anywhere torch runs."""

    name = "torch"

    def plan(self, metadata: AttentionMetadata) -> None:
        super().plan(metadata)
        self._plan = plan_step(metadata)

    def forward(self, q, k, v, k_cache, v_cache):
        plan = self._plan
        write_kv(k, v, k_cache, v_cache, plan)
        if plan.all_decode and q.shape[0] == plan.num_tokens:
            return decode_attention(q, k_cache, v_cache, plan.decode, self.scale)
        # Padding tokens past the last row get zeros.
        out = torch.empty_like(q) if q.shape[0] == plan.num_tokens else torch.zeros_like(q)
        if plan.decode is not None:
            dq = q[plan.decode.tokens]
            out[plan.decode.tokens] = decode_attention(dq, k_cache, v_cache, plan.decode, self.scale)
        table = self.metadata.block_tables
        for row in plan.prefill:
            sl = slice(row.start, row.start + row.q_len)
            out[sl] = prefill_row_attention(q[sl], k_cache, v_cache, table[row.row], row.seq_len, self.scale)
        return out
