import pytest
import torch

from kernels.paged_prefill_attention import (
    TileClass,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    plan_tiles,
)
from tests.kernels.paged_case import DTYPES, GQA, assert_within_budget, compact, make_case, poisoned_like

# Mixed rows: decode rows (q_len 1), a whole prompt, prompt chunks after a cached prefix
# (chunked prefill / prefix-cache hit), and an empty row; lengths off the block size.
QUERY_LENS = [1, 21, 40, 1, 3, 0, 70]
SEQ_LENS = [37, 21, 90, 1, 19, 12, 70]


def _check(case, tiles=None):
    head_dim = case.q.shape[-1]
    scale = head_dim**-0.5
    args = (case.query_start_loc, case.seq_lens)
    out = poisoned_like(case.q)
    paged_prefill_attention(case.q, case.k_cache, case.v_cache, *args, case.block_tables, scale,
                            case.max_query_len, out, tiles=tiles)
    k32, v32, t32 = compact(case, torch.float32)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args, t32, scale)
    k_dt, v_dt, t_dt = compact(case, case.q.dtype)
    ref_dt = paged_prefill_attention_ref(case.q, k_dt, v_dt, *args, t_dt, scale)
    n = case.num_real_tokens
    assert_within_budget(out[:n], ref32[:n], ref_dt[:n])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
def test_prefill_matches_ref(num_heads, num_kv_heads, head_dim, dtype):
    case = make_case(QUERY_LENS, SEQ_LENS, num_heads, num_kv_heads, head_dim, dtype=dtype, seed=5)
    _check(case)


@pytest.mark.parametrize("block_n", [16, 32])
def test_prefill_one_tile_class_small_blocks(block_n):
    # Every row through one tile height, with key steps both shorter and longer than a cache block.
    case = make_case(QUERY_LENS, SEQ_LENS, 8, 2, 64, block_size=32 if block_n == 16 else 8,
                     dtype=torch.float16, seed=6)
    cls = TileClass(32, block_n, 4, 2, kv_fastest=block_n == 16)  # both grid orders
    tiles = plan_tiles(case.query_lens, 4, case.q.device, classes=[cls])
    _check(case, tiles)


def test_plan_tiles_covers_every_query_once():
    query_lens = [1, 1, 5, 300, 0, 17]
    for group in (1, 4, 5):
        tiles = plan_tiles(query_lens, group, torch.device("cpu"))
        covered = [[0] * q for q in query_lens]
        for t in tiles:
            block_q = t.cls.block_m // (1 << (group - 1).bit_length())
            for row, q0 in zip(t.tile_seq.tolist(), t.tile_q.tolist()):
                for i in range(q0, min(q0 + block_q, query_lens[row])):
                    covered[row][i] += 1
        assert all(c == 1 for row in covered for c in row), group
        # A decode row gets the smallest tile.
        assert min(t.cls.block_m for t in tiles) == 16 or group > 16
