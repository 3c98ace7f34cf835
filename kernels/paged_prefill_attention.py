"""Varlen causal attention over a paged KV cache (prefill chunks, prefix hits, mixed batches).

Row b has q_len_b query tokens, the last q_len_b positions of a context of seq_lens[b] tokens that
is already in the cache; each query attends to every context position up to its own.

A program owns one tile of one row and one kv head. The tile's BLOCK_M rows are BLOCK_Q query
tokens times the GROUP query heads of that kv head (row m = token m // GROUP_PAD, head
m % GROUP_PAD), so K/V are read once per kv head, not once per query head. Keys the whole tile may
see are streamed without masks; only the last few key blocks near the diagonal are masked.

Tiles are listed on the host (`plan_tiles`), one list per tile height: a decode row (q_len 1) gets
a 16-row tile, a long prompt chunk 128-row tiles, so a mixed batch wastes little work.

An fp8 cache (float8 e4m3fn, one static scale each for K and V) is loaded as 1-byte elements and
converted to q's dtype in registers; k_scale folds into the softmax scale, v_scale multiplies the
output (the same as scaling every element, as the decode kernel does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _attend(
    acc, m_i, l_i,  # [BLOCK_M, HEAD_DIM], [BLOCK_M], [BLOCK_M] fp32 running state
    q,  # [BLOCK_M, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    table,  # pointer to this row's block table
    n0, seq_len, pos,  # first key of the step; context length; [BLOCK_M] query positions
    head_off, qk_scale, stride_c_block, stride_c_offset,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if MASK:
        n_ok = n < seq_len
        block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    else:
        block = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
    tok = block * stride_c_block + (n % BLOCK_SIZE) * stride_c_offset + head_off  # [BLOCK_N]
    if MASK:
        k = tl.load(k_cache_ptr + tok[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_cache_ptr + tok[:, None] + d[None, :]).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    if MASK:
        s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(v_cache_ptr + tok[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(q.dtype)
    else:
        v = tl.load(v_cache_ptr + tok[:, None] + d[None, :]).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    tile_seq_ptr,  # [num_tiles] int32; the row of each tile
    tile_q_ptr,  # [num_tiles] int32; the tile's first query index within its row
    out_ptr,  # [num_tokens, num_heads, head_dim]
    qk_scale,  # softmax scale * log2(e) (* k_scale for an fp8 cache)
    v_scale,  # the fp8 cache's V scale (unused otherwise)
    stride_q_t, stride_q_h,
    stride_o_t, stride_o_h,
    stride_bt_s,
    stride_c_block, stride_c_offset, stride_c_head,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # next power of two >= GROUP
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # tile rows = BLOCK_Q tokens * GROUP_PAD heads
    BLOCK_N: tl.constexpr,  # keys per loop step
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else "tf32" (unused by 16-bit)
    KV_FASTEST: tl.constexpr,  # grid (kv heads, tiles) instead of (tiles, kv heads)
    FP8: tl.constexpr,  # the cache is float8 e4m3
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD
    if KV_FASTEST:
        kv_head = tl.program_id(0)
        tile = tl.program_id(1)
    else:
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q_ptr + tile)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # context position of the row's first query

    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    qi = q0 + m // GROUP_PAD
    g = m % GROUP_PAD
    row_ok = (qi < q_len) & (g < GROUP)
    heads = kv_head * GROUP + g
    token = (q_begin + qi).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_t + heads[:, None] * stride_q_h + d[None, :],
                mask=row_ok[:, None], other=0.0)
    pos = first_pos + qi

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_s
    head_off = kv_head * stride_c_head
    # Keys 0 .. first_pos + q0 are seen by every row of the tile; the last row sees BLOCK_Q - 1 more.
    full_end = (first_pos + q0 + 1) // BLOCK_N * BLOCK_N
    hi = tl.minimum(seq_len, first_pos + q0 + BLOCK_Q)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table, n0, seq_len, pos,
                                head_off, qk_scale, stride_c_block, stride_c_offset,
                                HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    for n0 in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table, n0, seq_len, pos,
                                head_off, qk_scale, stride_c_block, stride_c_offset,
                                HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8:
        out = out * v_scale
    o = out_ptr + token[:, None] * stride_o_t + heads[:, None] * stride_o_h + d[None, :]
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class TileClass:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Short rows are bound by memory: run the kv heads of one tile together so that they read
    # whole token rows of the cache. Long rows are bound by compute: run a kv head's tiles
    # together so that its K/V stay in L2.
    kv_fastest: bool = False


# Tile heights tried smallest first: a row goes to the first class whose tile holds its q_len tokens.
TILE_CLASSES = (
    TileClass(block_m=16, block_n=64, num_warps=4, num_stages=3, kv_fastest=True),
    TileClass(block_m=64, block_n=64, num_warps=4, num_stages=3, kv_fastest=True),
    TileClass(block_m=128, block_n=64, num_warps=8, num_stages=3),
)


@dataclass(frozen=True)
class TileLaunch:
    cls: TileClass
    tile_seq: torch.Tensor  # [num_tiles] int32
    tile_q: torch.Tensor  # [num_tiles] int32


def plan_tiles(query_lens: Sequence[int], group: int, device: torch.device,
               classes: Sequence[TileClass] = TILE_CLASSES) -> tuple[TileLaunch, ...]:
    """Host-side tile lists, one per tile class in use; built once per step."""
    group_pad = triton.next_power_of_2(group)
    usable = [c for c in classes if c.block_m >= group_pad] or [
        TileClass(group_pad, 64, 4, 2)]
    per_class: list[tuple[list[int], list[int]]] = [([], []) for _ in usable]
    for row, q_len in enumerate(query_lens):
        k = next((i for i, c in enumerate(usable) if q_len * group_pad <= c.block_m), len(usable) - 1)
        block_q = usable[k].block_m // group_pad
        for q0 in range(0, q_len, block_q):
            per_class[k][0].append(row)
            per_class[k][1].append(q0)
    # Every list starts 16-byte aligned (padded to 4 int32): Triton specializes a pointer on its
    # 16-byte alignment, so unaligned lists would compile up to 4 variants of a tile class, each
    # on first use (engine/warmup.py warms one kernel per class before a node serves).
    flat: list[int] = []
    spans = []
    for seqs, qs in per_class:
        lo = len(flat)
        flat += seqs + [0] * (-len(seqs) % 4)
        spans.append((lo, len(flat)))
        flat += qs + [0] * (-len(qs) % 4)
    packed = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
    launches = []
    for c, (seqs, _), (lo, mid) in zip(usable, per_class, spans):
        n = len(seqs)
        if n:
            launches.append(TileLaunch(c, packed[lo : lo + n], packed[mid : mid + n]))
    return tuple(launches)


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    *,
    tiles: Sequence[TileLaunch] | None = None,  # from plan_tiles; None = built here (syncs)
    k_scale: float = 1.0,  # fp8 cache: the stored K is k / k_scale
    v_scale: float = 1.0,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.dtype in (q.dtype, torch.float8_e4m3fn), (k_cache.dtype, q.dtype)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert fp8 or k_scale == v_scale == 1.0, "KV scales apply to an fp8 cache only"
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.stride(2) == 1, q.stride()
    assert query_start_loc.dtype == seq_lens.dtype == block_tables.dtype == torch.int32
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.is_contiguous()
    assert seq_lens.is_contiguous() and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    if tiles is None:
        query_lens = query_start_loc.diff().tolist()
        assert max(query_lens) <= max_query_len, (query_lens, max_query_len)
        tiles = plan_tiles(query_lens, group, q.device)
    for t in tiles:
        num_tiles = t.tile_seq.shape[0]
        grid = (num_kv_heads, num_tiles) if t.cls.kv_fastest else (num_tiles, num_kv_heads)
        assert grid[1] < 65536, grid  # CUDA's limit on the second grid dimension
        _prefill_kernel[grid](
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, t.tile_seq, t.tile_q, out,
            scale * _LOG2E * k_scale, v_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size, BLOCK_M=t.cls.block_m, BLOCK_N=t.cls.block_n,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FASTEST=t.cls.kv_fastest,
            FP8=fp8, num_warps=t.cls.num_warps, num_stages=t.cls.num_stages,
        )
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                max_query_len=None, out=None, k_scale=1.0, v_scale=1.0):
    """One row at a time in plain torch, in q's dtype (softmax in fp32). An fp8 cache is
    dequantized first (element * scale, in q's dtype)."""
    if k_cache.dtype == torch.float8_e4m3fn:
        k_cache = k_cache.to(q.dtype) * k_scale
        v_cache = v_cache.to(q.dtype) * v_scale
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    for b in range(seq_lens.shape[0]):
        start, stop, n = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if stop == start:
            continue
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].repeat_interleave(group, dim=1)  # [n, heads, d]
        v = v_cache[blocks].flatten(0, 1)[:n].repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,nhd->hqn", q[start:stop], k) * scale
        q_pos = torch.arange(n - (stop - start), n, device=q.device)
        s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        out[start:stop] = torch.einsum("hqn,nhd->qhd", p, v)
    return out


def causal_flops(query_lens: Sequence[int], seq_lens: Sequence[int], num_heads: int, head_dim: int) -> int:
    """Useful FLOPs: 2 matmuls x 2 flops per (query, visible key, dim)."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(query_lens, seq_lens))
    return 4 * pairs * num_heads * head_dim


if __name__ == "__main__":
    # python -m kernels.paged_prefill_attention  (CUDA): TFLOP/s vs SDPA (flash) on the same problem
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    heads, kv, d, bs, dt = 32, 8, 128, 16, torch.bfloat16
    for n in (4096, 8192, 16384):
        nblk = n // bs
        k_cache = torch.randn(nblk + 1, bs, kv, d, dtype=dt, device="cuda")
        v_cache = torch.randn_like(k_cache)
        table = (torch.randperm(nblk, device="cuda") + 1).int()[None]
        q = torch.randn(n, heads, d, dtype=dt, device="cuda")
        qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        lens = torch.tensor([n], dtype=torch.int32, device="cuda")
        tiles = plan_tiles([n], heads // kv, q.device)
        ms = triton.testing.do_bench(lambda: paged_prefill_attention(q, k_cache, v_cache, qsl, lens, table, d**-0.5, n, tiles=tiles))
        qc = q.transpose(0, 1)[None]
        kc = torch.randn(1, heads, n, d, dtype=dt, device="cuda")
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(qc, kc, kc, is_causal=True))
        tf = causal_flops([n], [n], heads, d) / 1e9
        print(f"tokens {n:6d}: {tf / ms:6.1f} TFLOP/s, sdpa {tf / ref_ms:6.1f}  ratio {ref_ms / ms:.2f}")
