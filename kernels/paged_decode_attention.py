"""Decode attention over a paged KV cache: one query token per sequence.

A program owns one (sequence, kv head, split): it loads the GROUP query heads that share the kv
head as the rows of one tile (padded to 16 rows for `tl.dot`), so every K/V element is read once
per kv head, and walks the split's tokens BLOCK_N at a time through the block table with an
online softmax in fp32.

Split-KV (flash-decoding): when the batch has too few (sequence, kv head) pairs to fill the GPU,
the context is cut into `num_splits` ranges; each program writes a normalized partial output and
its log-sum-exp, and a second small kernel merges them.

An fp8 cache (float8 e4m3fn, one static scale each for K and V) is read as 1-byte elements and
converted to q's dtype in registers; the scales are applied to the scores (k_scale folds into
the softmax scale) and to the output (v_scale), which is the same as multiplying every K and V
element by its scale, with two multiplies instead of one per element.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim]; written when not SPLIT
    part_out_ptr,  # [num_seqs, num_heads, num_splits, head_dim] fp32; written when SPLIT
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32 (log2 domain); written when SPLIT
    qk_scale,  # softmax scale * log2(e) (* k_scale for an fp8 cache)
    v_scale,  # 1.0, or the fp8 cache's V scale
    num_splits,
    stride_q_s, stride_q_h,
    stride_o_s, stride_o_h,
    stride_bt_s,
    stride_c_block, stride_c_offset, stride_c_head,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # >= max(16, GROUP), a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # tokens per loop step
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else "tf32" (unused by 16-bit)
    FP8: tl.constexpr,  # the cache is float8 e4m3: converted to COMPUTE as loaded, scaled
    COMPUTE: tl.constexpr,  # the dots' input dtype: q's, or fp16 for an fp8 cache (e4m3 -> f16 is one
    # cvt per two elements on sm89+; -> bf16 goes through f32)
    Q_RESCALE: tl.constexpr,  # q narrows to fp16 (max 65504): rows past 2^15 are scaled down by a
    # power of two, undone on their scores (exact), so no query overflows to inf
):
    # kv head fastest: the programs of one sequence run together and read whole token rows
    # (all kv heads of a token are adjacent in the cache).
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    if SPLIT:
        # Each sequence cuts its own context into num_splits equal ranges (whole BLOCK_N tiles),
        # so the launch depends only on the batch size: one CUDA graph serves every context length.
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(seq_len, start + split_len)
    else:
        start = 0
        end = seq_len

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    q = tl.load(q_ptr + seq * stride_q_s + heads[:, None] * stride_q_h + d[None, :],
                mask=head_ok[:, None], other=0.0)
    if Q_RESCALE:
        qf = q.to(tl.float32)
        q_max = tl.max(tl.abs(qf), 1)  # [GROUP_PAD]
        q_mul = tl.exp2(tl.ceil(tl.log2(tl.maximum(q_max, 32768.0) / 32768.0)))  # 1 up to 2^15
        q = (qf / q_mul[:, None]).to(COMPUTE)
        row_scale = q_mul * qk_scale  # [GROUP_PAD]
    else:
        q = q.to(COMPUTE)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_s
    head_off = kv_head * stride_c_head
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        tok = block * stride_c_block + (n % BLOCK_SIZE) * stride_c_offset + head_off  # [BLOCK_N]
        k = tl.load(k_cache_ptr + tok[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(COMPUTE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [GROUP_PAD, BLOCK_N]
        if Q_RESCALE:
            s = s * row_scale[:, None]
        else:
            s = s * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + tok[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(COMPUTE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        # An empty split (past the end of a short sequence) leaves l_i = 0: weight 0 in the merge.
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        if FP8:
            out = out * v_scale
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        row = (seq.to(tl.int64) * (GROUP * tl.num_programs(0)) + heads) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=head_ok[:, None])
        tl.store(part_lse_ptr + row, lse, mask=head_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 (a padded row) gives zeros
        if FP8:
            out = out * v_scale
        o = out_ptr + seq * stride_o_s + heads[:, None] * stride_o_h + d[None, :]
        tl.store(o, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,  # [num_seqs, num_heads, num_splits, head_dim] fp32
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32 (log2 domain)
    out_ptr,  # [num_seqs, num_heads, head_dim]
    num_splits,
    stride_o_s, stride_o_h,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    s_ok = s < num_splits
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse_ptr + row + s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))  # all -inf only for seq_len 0
    parts = tl.load(part_out_ptr + (row + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_s + head * stride_o_h + d, out.to(out_ptr.dtype.element_ty))


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_SM_COUNT: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, sm_count: int,
                      min_split_tokens: int = 256, ctas_per_sm: int = 2, max_splits: int = 16) -> int:
    """Split only when (sequence, kv head) pairs are too few to keep every SM streaming.

    Tuned on the H100 (bench/kernels_bench.py --sweep, 2026-11-23): batch 64 x 4k and 32 x 8k are
    best unsplit, 8 x 32k with 4-16 splits, 1 x 32k with 16. Batch 1 at a 1k context walks 16
    tiles one after the other in 8 programs unsplit (~25 us a layer on the H100); 16 splits cut
    that to a few us. `max_seq_len` may be a bound (a CUDA graph passes max_model_len): each
    sequence splits its own context, so short ones just leave splits empty. A power of two.
    """
    programs = num_seqs * num_kv_heads
    want = triton.next_power_of_2(math.ceil(ctas_per_sm * sm_count / programs))
    most = max(1, max_seq_len // min_split_tokens)
    return max(1, min(want, most, max_splits))


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    *,
    max_seq_len: int | None = None,  # host copy (or bound) of seq_lens.max(); saves a device sync
    num_splits: int | None = None,  # None = heuristic; fixed for a CUDA graph (any seq_lens then)
    k_scale: float = 1.0,  # fp8 cache: the stored K is k / k_scale
    v_scale: float = 1.0,
    block_n: int | None = None,  # None: 64; an fp8 cache 128 where a program walks >= 1k tokens
    num_warps: int = 4,
    num_stages: int | None = None,  # None: 3
    fp8_compute: torch.dtype | None = None,  # an fp8 cache's dot dtype: fp16 on CUDA (default), q's otherwise
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.dtype in (q.dtype, torch.float8_e4m3fn), (k_cache.dtype, q.dtype)
    if k_cache.dtype != torch.float8_e4m3fn:
        assert k_scale == v_scale == 1.0, "KV scales apply to an fp8 cache only"
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.stride(2) == 1, q.stride()
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert seq_lens.dtype == torch.int32 and seq_lens.is_contiguous()
    assert block_tables.shape[0] == num_seqs and seq_lens.shape == (num_seqs,)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    compute = q.dtype
    if fp8 and q.dtype != torch.float32:
        compute = fp8_compute or (torch.float16 if q.is_cuda else q.dtype)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms(q.device))
    split = num_splits > 1
    if block_n is None:
        # H200 sweep (bench/decode_kernel_sweep.py, 2026-12-03): an fp8 cache with 128-token tiles
        # is 0.87-0.91x bf16's time at 64 x 1k, 256 x 1k, 64 x 4k, 8 x 32k; with 64-token tiles
        # 0.98-1.22x. Short split ranges (batch 1) stay faster with 64.
        long_walk = max_seq_len // num_splits >= 1024 or not split
        block_n = 128 if fp8 and long_walk else 64
    if num_stages is None:
        # 3 for every tile: since the fp8 path rescales large query rows (Q_RESCALE), 128-token fp8
        # tiles run best with 3 stages too (H200, 2026-12-03: 69 / 238 / 234 / 240 us at 64 x 1k,
        # 256 x 1k, 64 x 4k, 8 x 32k, vs 75 / 249 / 248 / 240 with 2)
        num_stages = 3
    if split:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # not touched
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * _LOG2E * k_scale, v_scale, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8, COMPUTE=_TL[compute],
        Q_RESCALE=compute == torch.float16 and q.dtype != torch.float16,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, out=None,
                               k_scale=1.0, v_scale=1.0):
    """One sequence at a time in plain torch, in q's dtype (softmax in fp32). An fp8 cache is
    dequantized first (element * scale, in q's dtype)."""
    if k_cache.dtype == torch.float8_e4m3fn:
        k_cache = k_cache.to(q.dtype) * k_scale
        v_cache = v_cache.to(q.dtype) * v_scale
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    for b in range(num_seqs):
        n = int(seq_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].repeat_interleave(group, dim=1)  # [n, heads, d]
        v = v_cache[blocks].flatten(0, 1)[:n].repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b], k) * scale
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        out[b] = torch.einsum("hn,nhd->hd", p, v)
    return out


def decode_bytes(num_seqs: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> int:
    """Bytes a decode step must move: K and V of every context token (in kv_dtype, default
    dtype), q read and out written (in dtype)."""
    elem = torch.finfo(dtype).bits // 8
    kv_elem = torch.finfo(kv_dtype or dtype).bits // 8
    return head_dim * (kv_elem * 2 * num_seqs * context * num_kv_heads + elem * 2 * num_seqs * num_heads)


if __name__ == "__main__":
    # python -m kernels.paged_decode_attention  (CUDA): achieved bandwidth vs the 3.0 TB/s copy ceiling,
    # bf16 cache and fp8 (e4m3) cache; the fp8 time should approach half the bf16 one where KV dominates
    torch.manual_seed(0)
    heads, kv, d, bs, dt = 32, 8, 128, 16, torch.bfloat16
    for batch, ctx in ((64, 4096), (8, 32768), (256, 1024), (1, 32768), (1, 1024)):
        nblk = ctx // bs
        k_cache = torch.randn(batch * nblk + 1, bs, kv, d, dtype=dt, device="cuda")
        v_cache = torch.randn_like(k_cache)
        tables = (torch.randperm(batch * nblk, device="cuda") + 1).view(batch, nblk).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, d, dtype=dt, device="cuda")
        times = {}
        for name, kc, vc in (("bf16", k_cache, v_cache),
                             ("fp8", k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn))):
            ms = triton.testing.do_bench(lambda: paged_decode_attention(q, kc, vc, tables, lens, d**-0.5, max_seq_len=ctx))
            tbs = decode_bytes(batch, ctx, heads, kv, d, dt, kc.dtype) / ms / 1e9
            times[name] = ms
            print(f"{name:4s} batch {batch:4d} ctx {ctx:6d}: {ms * 1e3:8.1f} us  {tbs:5.2f} TB/s  ({tbs / 3.0:.0%} of 3.0)")
            del kc, vc
        print(f"     fp8 / bf16 time: {times['fp8'] / times['bf16']:.2f}")
