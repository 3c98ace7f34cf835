"""Random paged-attention problems and the error budget the kernels are held to."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's tl.dot on bf16 is wrong (DEVICE.md), so bf16 is checked on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
GQA = [(4, 4), (8, 2), (5, 1)]  # (num_heads, num_kv_heads)
EPS = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@dataclass
class PagedCase:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]; the rows' new tokens, then padding
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]; K of the new tokens
    v: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]; NaN where unwritten
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, random ids, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 for padding tokens
    query_lens: list[int]
    context_lens: list[int]
    num_real_tokens: int

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)


def make_case(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, *, block_size=16,
              dtype=torch.float32, device=DEVICE, write_new=True, pad_tokens=0, spare_blocks=5,
              first_block=1, num_blocks=None, seed=0) -> PagedCase:
    """Row b: seq_lens[b] context tokens, of which the last query_lens[b] are new.

    The cached prefix is written into the cache; the new tokens too when write_new (kernel tests),
    not when the test writes them itself (backend tests). Block ids are a random permutation of
    first_block.. (first_block > 1 puts them far out, for the index-overflow test). Only blocks in
    use are poisoned with NaN when num_blocks is given (a lazily allocated huge cache).
    """
    g = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-s // block_size) for s in seq_lens]
    used = sum(blocks_per_row)
    ids = torch.randperm(used + spare_blocks, generator=g)[:used] + first_block
    max_blocks = max(blocks_per_row) + 2  # padding columns of zeros
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    at = 0
    for b, n in enumerate(blocks_per_row):
        table[b, :n] = ids[at : at + n].int()
        at += n

    shape_blocks = num_blocks if num_blocks is not None else first_block + used + spare_blocks
    shape = (shape_blocks, block_size, num_kv_heads, head_dim)
    if num_blocks is None:
        k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    else:  # pages are only touched where written
        k_cache = torch.empty(shape, dtype=dtype, device=device)
        v_cache = torch.empty(shape, dtype=dtype, device=device)
        for c in (k_cache, v_cache):
            c[ids.to(device)] = float("nan")
            c[0] = float("nan")

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype).to(device)

    slots, rows_k, rows_v = [], [], []
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    for b, (q_len, n) in enumerate(zip(query_lens, seq_lens)):
        assert 0 <= q_len <= n
        kb, vb = randn(n, num_kv_heads, head_dim), randn(n, num_kv_heads, head_dim)
        pos = torch.arange(n)
        row_slots = (table[b, pos // block_size].long() * block_size + pos % block_size).to(device)
        cached = n - q_len if not write_new else n
        flat_k[row_slots[:cached]] = kb[:cached]
        flat_v[row_slots[:cached]] = vb[:cached]
        slots.append(row_slots[n - q_len :])
        rows_k.append(kb[n - q_len :])
        rows_v.append(vb[n - q_len :])
    num_real = sum(query_lens)
    slots.append(torch.full((pad_tokens,), -1, dtype=torch.long, device=device))
    rows_k.append(randn(pad_tokens, num_kv_heads, head_dim))
    rows_v.append(randn(pad_tokens, num_kv_heads, head_dim))
    qsl = [0]
    for q_len in query_lens:
        qsl.append(qsl[-1] + q_len)
    return PagedCase(
        q=randn(num_real + pad_tokens, num_heads, head_dim, scale=2.0),  # peakier softmax
        k=torch.cat(rows_k),
        v=torch.cat(rows_v),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        slot_mapping=torch.cat(slots),
        query_lens=list(query_lens),
        context_lens=list(seq_lens),
        num_real_tokens=num_real,
    )


def compact(case: PagedCase, dtype: torch.dtype):
    """(k_cache, v_cache, block_tables) holding only the blocks in use, cast to dtype.

    Lets the fp32 reference run on a huge lazily allocated cache without touching all of it.
    """
    ids = torch.unique(case.block_tables)
    ids = ids[ids != 0]
    remap = {int(b): i + 1 for i, b in enumerate(ids.tolist())}
    table = case.block_tables.cpu().clone().apply_(lambda b: remap.get(b, 0)).to(case.block_tables.device)
    def take(c):
        small = torch.zeros(len(ids) + 1, *c.shape[1:], dtype=dtype, device=c.device)
        small[1:] = c[ids.long()].to(dtype)
        return small
    return take(case.k_cache), take(case.v_cache), table


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def assert_within_budget(out, ref_fp32, ref_same_dtype, what=""):
    """The kernel's max error vs fp32 may be at most 2x plain torch's in the same dtype, + eps."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = (out.float() - ref_fp32.float()).abs().max().item()
    torch_err = (ref_same_dtype.float() - ref_fp32.float()).abs().max().item()
    budget = 2 * torch_err + EPS[out.dtype]
    assert err <= budget, f"{what}: error {err:.3g} > budget {budget:.3g} (torch {torch_err:.3g})"
