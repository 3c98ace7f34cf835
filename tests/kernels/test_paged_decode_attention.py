import pytest
import torch

from kernels.paged_decode_attention import (
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from tests.kernels.paged_case import DTYPES, GQA, assert_within_budget, compact, make_case, poisoned_like

# Lengths off the block size, a length-1 context, one exactly on a block edge.
SEQ_LENS = [37, 1, 16, 130, 5, 71]


def _check(case, num_splits, block_n=64):
    head_dim = case.q.shape[-1]
    scale = head_dim**-0.5
    out = poisoned_like(case.q)
    paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                           scale, out, num_splits=num_splits, block_n=block_n)
    k32, v32, table32 = compact(case, torch.float32)
    ref32 = paged_decode_attention_ref(case.q.float(), k32, v32, table32, case.seq_lens, scale)
    k_dt, v_dt, table_dt = compact(case, case.q.dtype)
    ref_dt = paged_decode_attention_ref(case.q, k_dt, v_dt, table_dt, case.seq_lens, scale)
    assert_within_budget(out, ref32, ref_dt, f"splits={num_splits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
def test_decode_matches_ref(num_heads, num_kv_heads, head_dim, dtype):
    case = make_case([1] * len(SEQ_LENS), SEQ_LENS, num_heads, num_kv_heads, head_dim, dtype=dtype, seed=2)
    _check(case, num_splits=1)


@pytest.mark.parametrize("num_splits", [None, 2, 3, 40])
def test_decode_split_kv(num_splits):
    # Short rows get empty splits when the longest row sets the split length.
    case = make_case([1] * len(SEQ_LENS), SEQ_LENS, 8, 2, 64, dtype=torch.float16, seed=3)
    _check(case, num_splits=num_splits, block_n=32)


def test_decode_block_size_8_and_no_padding_columns():
    case = make_case([1, 1, 1], [9, 24, 3], 4, 4, 64, block_size=8, seed=4)
    case.block_tables = case.block_tables[:, :3].contiguous()  # exactly the blocks needed
    _check(case, num_splits=None)


def test_choose_num_splits():
    sms = 132
    assert choose_num_splits(64, 8, 4096, sms) == 1  # 512 programs already
    assert choose_num_splits(32, 8, 8192, sms) <= 2
    assert choose_num_splits(8, 8, 32768, sms) in (4, 8, 16)  # 64 programs: split the context
    assert choose_num_splits(1, 8, 32768, sms) == 16  # capped at 16 splits
    assert choose_num_splits(8, 8, 300, sms) == 1  # too short to be worth splitting
