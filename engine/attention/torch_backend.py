"""Reference attention backend in plain torch (CPU and GPU).

Decode rows (q_len 1) of a step are done together: one gather of their blocks
(`k_cache[block_tables]`, into a buffer kept across layers) and a masked batched attention. Rows with more than one query token
(prefill chunks) are done one by one with `scaled_dot_product_attention` and a causal mask
shifted by the part of the context already cached.

Scores and outputs are computed in the input dtype, softmax in fp32 then cast back, as
HF transformers' eager attention does.

An fp8 cache (float8 e4m3fn) is written through `quantize_fp8` (x / scale, saturated; the same
bytes as the Triton write kernel) and gathered as 1-byte elements, then converted to q's dtype;
k_scale folds into the softmax scale and v_scale multiplies the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata
from kernels.kv_cache_write import FP8_DTYPE, quantize_fp8


@dataclass(frozen=True)
class _DecodeRows:
    tokens: torch.Tensor  # [n] int64; token index in q of each row with q_len 1
    block_tables: torch.Tensor  # [n, max_blocks] int32
    seq_lens: torch.Tensor  # [n] int64
    max_seq_len: int


@dataclass(frozen=True)
class _DecodeGather:
    """Where a step's decode rows read the cache; built at the first layer, used by all."""

    blocks: torch.Tensor  # [n * num_blocks] int64; padding columns point at the row's first block
    past_end: torch.Tensor  # [t] int64; flat gathered positions past each row's end
    masked: torch.Tensor  # [1, n, 1, ctx] bool; positions past each row's end
    num_blocks: int  # blocks per row; ctx = num_blocks * block_size


def _decode_gather(rows: _DecodeRows, block_size: int) -> _DecodeGather:
    n = rows.seq_lens.shape[0]
    num_blocks = -(-rows.max_seq_len // block_size)
    ctx = num_blocks * block_size
    table = rows.block_tables[:, :num_blocks].long()
    used = torch.arange(num_blocks, device=table.device)[None, :] * block_size < rows.seq_lens[:, None]
    table = torch.where(used, table, table[:, :1])
    pos = torch.arange(ctx, device=table.device)
    masked = pos[None, :] >= rows.seq_lens[:, None]  # [n, ctx]
    past_end = masked.flatten().nonzero().squeeze(1)
    return _DecodeGather(table.flatten(), past_end, masked.view(1, n, 1, ctx), num_blocks)


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
            tokens=tokens,
            block_tables=md.block_tables[rows],
            seq_lens=md.seq_lens[rows].long(),
            max_seq_len=max(md.seq_lens_cpu[b] for b in decode_rows),
        )
    all_decode = len(decode_rows) == md.num_seqs and starts[-1] == md.num_seqs
    return _StepPlan(write_tokens, write_slots, decode, prefill, all_decode, starts[-1])


def _raw(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as its bytes: gathers and copies go through uint8 kernels, which every device has."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    plan: _StepPlan,
    k_scale: float = 1.0,  # fp8 cache only
    v_scale: float = 1.0,
) -> None:
    if plan.write_tokens is not None:
        k, v = k[plan.write_tokens], v[plan.write_tokens]
    if k_cache.dtype == FP8_DTYPE:  # index_copy_ has no fp8 kernel on CPU: copy the bytes
        k, v = quantize_fp8(k, k_scale).view(torch.uint8), quantize_fp8(v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, plan.write_slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, plan.write_slots, v.to(v_cache.dtype))


def decode_attention(
    q: torch.Tensor,  # [n, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    gather: _DecodeGather,
    scale: float,
    k_buf: torch.Tensor,  # [n * gather.num_blocks, block_size, num_kv_heads, head_dim] scratch
    v_buf: torch.Tensor,  # same
    k_scale: float = 1.0,  # fp8 cache: k_buf / v_buf are in the cache's dtype, kd_buf / vd_buf in q's
    v_scale: float = 1.0,
    kd_buf: torch.Tensor | None = None,
    vd_buf: torch.Tensor | None = None,
) -> torch.Tensor:  # [n, num_heads, head_dim]
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    torch.index_select(_raw(k_cache), 0, gather.blocks, out=_raw(k_buf))
    torch.index_select(_raw(v_cache), 0, gather.blocks, out=_raw(v_buf))
    if k_cache.dtype == FP8_DTYPE:  # 1-byte gather, then to q's dtype; the scales fold in below
        k_buf, v_buf = kd_buf.copy_(k_buf), vd_buf.copy_(v_buf)
        scale = scale * k_scale
    # Slots past a row's end may hold anything (NaN in an unwritten slot): zero them in V so that
    # 0 * v stays 0; in K the mask below overwrites whatever score they give.
    v_buf.view(-1, num_kv_heads, head_dim).index_fill_(0, gather.past_end, 0)
    k = k_buf.view(n, -1, num_kv_heads, head_dim)  # [n, ctx, kv, d]
    v = v_buf.view(n, -1, num_kv_heads, head_dim)
    ctx = k.shape[1]
    qg = q.reshape(n, num_kv_heads, group, head_dim).to(k.dtype)
    # kv-head-major scores so that each head's slice is contiguous: one bmm per kv head on
    # strided views of the gathered K/V, written in place (no copy of K/V, no stack).
    scores = torch.empty(num_kv_heads, n, group, ctx, dtype=k.dtype, device=k.device)
    for h in range(num_kv_heads):
        torch.baddbmm(scores[h], qg[:, h], k[:, :, h].transpose(1, 2), beta=0, alpha=scale, out=scores[h])
    scores.masked_fill_(gather.masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.empty(n, num_kv_heads, group, head_dim, dtype=v.dtype, device=v.device)
    for h in range(num_kv_heads):
        out[:, h] = torch.bmm(probs[h], v[:, :, h])
    if k_cache.dtype == FP8_DTYPE and v_scale != 1.0:
        out.mul_(v_scale)
    return out.view(n, num_heads, head_dim).to(q.dtype)


def prefill_row_attention(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
    scale: float,
    k_scale: float = 1.0,  # fp8 cache only
    v_scale: float = 1.0,
) -> torch.Tensor:  # [q_len, num_heads, head_dim]
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    blocks = block_table[: -(-seq_len // block_size)].long()
    fp8 = k_cache.dtype == FP8_DTYPE
    k = _raw(k_cache)[blocks].flatten(0, 1)[:seq_len]  # [seq_len, kv, d]
    v = _raw(v_cache)[blocks].flatten(0, 1)[:seq_len]
    if fp8:
        k, v = k.view(FP8_DTYPE).to(q.dtype), v.view(FP8_DTYPE).to(q.dtype)
        scale = scale * k_scale
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, seq_len, d]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    # query i sits at position seq_len - q_len + i and sees keys 0 .. that position.
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).to(k.dtype), k, v, attn_mask=allowed, scale=scale
    )
    if fp8 and v_scale != 1.0:
        out = out * v_scale
    return out.transpose(0, 1).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    """Plain-torch attention over the paged cache; runs anywhere torch runs."""

    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self._scratch: dict[tuple, torch.Tensor] = {}  # gather buffers, reused across layers/steps

    def plan(self, metadata: AttentionMetadata) -> None:
        super().plan(metadata)
        self._plan = plan_step(metadata)
        self._gather: _DecodeGather | None = None

    def _buffer(self, which: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        # Fresh large CPU allocations are page-faulted in on every use; a kept buffer is not.
        key = (which, like.dtype, like.device)
        numel = math.prod(shape)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._scratch[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    def _decode(self, q, k_cache, v_cache):
        if self._gather is None:
            self._gather = _decode_gather(self._plan.decode, k_cache.shape[1])
        shape = (self._gather.blocks.shape[0], *k_cache.shape[1:])
        k_buf = self._buffer("k", shape, k_cache)
        v_buf = self._buffer("v", shape, v_cache)
        if k_cache.dtype != FP8_DTYPE:
            return decode_attention(q, k_cache, v_cache, self._gather, self.scale, k_buf, v_buf)
        kd_buf = self._buffer("kd", shape, q)
        vd_buf = self._buffer("vd", shape, q)
        return decode_attention(q, k_cache, v_cache, self._gather, self.scale, k_buf, v_buf,
                                self.k_scale, self.v_scale, kd_buf, vd_buf)

    def forward(self, q, k, v, k_cache, v_cache):
        plan = self._plan
        write_kv(k, v, k_cache, v_cache, plan, self.k_scale, self.v_scale)
        if plan.all_decode and q.shape[0] == plan.num_tokens:
            return self._decode(q, k_cache, v_cache)
        # Padding tokens past the last row get zeros.
        out = torch.empty_like(q) if q.shape[0] == plan.num_tokens else torch.zeros_like(q)
        if plan.decode is not None:
            out[plan.decode.tokens] = self._decode(q[plan.decode.tokens], k_cache, v_cache)
        table = self.metadata.block_tables
        for row in plan.prefill:
            sl = slice(row.start, row.start + row.q_len)
            out[sl] = prefill_row_attention(q[sl], k_cache, v_cache, table[row.row], row.seq_len, self.scale,
                                            self.k_scale, self.v_scale)
        return out
