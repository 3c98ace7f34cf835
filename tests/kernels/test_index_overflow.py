"""Block ids so large that block_id * block_stride passes 2**31 elements.

The cache is [2**23 + 64, 16, 1, 16] fp16 (256 elements a block, 4.3 GB each for K and V) made
with torch.empty: the OS maps its pages only when written, and only the ~20 blocks in use are
(the interpreter hands CPU tensors to the kernel without copying them). Every block id used is
>= 2**23, so its element offset is >= 2**31 and an int32 offset would wrap to a wrong address.
"""
import torch

from kernels.kv_cache_write import write_kv_cache
from kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from tests.kernels.paged_case import assert_within_budget, compact, make_case, poisoned_like

FIRST = 2**23
NUM_BLOCKS = FIRST + 64  # 20 blocks in use + spares
QUERY_LENS, SEQ_LENS = [1, 20, 1], [45, 150, 17]  # row 1 has whole unmasked key steps


def _case(write_new):
    case = make_case(QUERY_LENS, SEQ_LENS, 4, 1, 16, dtype=torch.float16, first_block=FIRST,
                     num_blocks=NUM_BLOCKS, write_new=write_new, seed=9)
    assert case.k_cache.stride(0) * int(case.block_tables[case.block_tables > 0].min()) >= 2**31
    return case


def _refs(case, fn, args):
    k32, v32, t32 = compact(case, torch.float32)
    k16, v16, t16 = compact(case, torch.float16)
    return fn(case.q.float(), k32, v32, *args(t32)), fn(case.q, k16, v16, *args(t16))


def test_write_at_huge_block_ids():
    case = _case(write_new=False)
    write_kv_cache(case.k, case.v, case.k_cache, case.v_cache, case.slot_mapping)
    flat_k = case.k_cache.view(-1, 1, 16)
    flat_v = case.v_cache.view(-1, 1, 16)
    assert torch.equal(flat_k[case.slot_mapping], case.k)
    assert torch.equal(flat_v[case.slot_mapping], case.v)


def test_prefill_at_huge_block_ids():
    case = _case(write_new=True)
    qsl, lens = case.query_start_loc, case.seq_lens
    out = poisoned_like(case.q)
    paged_prefill_attention(case.q, case.k_cache, case.v_cache, qsl, lens, case.block_tables, 0.25,
                            case.max_query_len, out)
    ref32, ref16 = _refs(case, paged_prefill_attention_ref, lambda t: (qsl, lens, t, 0.25))
    assert_within_budget(out, ref32, ref16)


def test_decode_at_huge_block_ids():
    case = _case(write_new=True)
    rows = case.query_start_loc[1:] - 1  # each row's last token is its decode query
    case.q = case.q[rows.long()].contiguous()
    for splits in (1, 3):
        out = poisoned_like(case.q)
        paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                               0.25, out, num_splits=splits, block_n=16)
        ref32, ref16 = _refs(case, paged_decode_attention_ref, lambda t: (t, case.seq_lens, 0.25))
        assert_within_budget(out, ref32, ref16, f"splits={splits}")
