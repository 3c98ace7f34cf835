"""The kernels at real shapes on a GPU: 32 query / 8 kv heads, head_dim 128, bf16 and fp16."""
import pytest
import torch

from engine.attention.base import AttentionMetadata
from engine.attention.triton_backend import TritonAttentionBackend
from kernels.kv_cache_write import write_kv_cache, write_kv_cache_ref
from kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from tests.kernels.paged_case import assert_within_budget, compact, make_case, poisoned_like

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = HEAD_DIM**-0.5
HALF = [torch.bfloat16, torch.float16]


def _lens(batch, most, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, most + 1, (batch,), generator=g).tolist()


DECODE = {
    "b1_ctx1": [1],
    "b1_ctx32k": [32768],
    "b8_ctx32k": [32768, 32767, 1, 17, 30001, 4096, 32000, 16385],
    "b64_ctx4k": _lens(64, 4096, 1),
    "b256_ctx2k": _lens(256, 2048, 2),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", sorted(DECODE))
def test_decode_real_shapes(name, dtype):
    lens = DECODE[name]
    case = make_case([1] * len(lens), lens, HEADS, KV_HEADS, HEAD_DIM, dtype=dtype, seed=11)
    k32, v32, t32 = compact(case, torch.float32)
    ref32 = paged_decode_attention_ref(case.q.float(), k32, v32, t32, case.seq_lens, SCALE)
    k_dt, v_dt, t_dt = compact(case, dtype)
    ref_dt = paged_decode_attention_ref(case.q, k_dt, v_dt, t_dt, case.seq_lens, SCALE)
    for splits in (None, 1):  # the heuristic's choice and the one-pass kernel
        out = poisoned_like(case.q)
        paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                               SCALE, out, num_splits=splits)
        assert_within_budget(out, ref32, ref_dt, f"{name} splits={splits}")


PREFILL = {
    # (query_lens, seq_lens): a prompt, chunks after cached prefixes, decode rows, short prompts
    "mixed": ([4096, 1, 1000, 1, 17, 300, 1], [4096, 5000, 3000, 1, 17, 8000, 32768]),
    "chunks": ([512] * 4, [512, 2048, 8192, 700]),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", sorted(PREFILL))
def test_prefill_real_shapes(name, dtype):
    query_lens, seq_lens = PREFILL[name]
    case = make_case(query_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, dtype=dtype, seed=12)
    args = (case.query_start_loc, case.seq_lens)
    out = poisoned_like(case.q)
    paged_prefill_attention(case.q, case.k_cache, case.v_cache, *args, case.block_tables, SCALE,
                            case.max_query_len, out)
    k32, v32, t32 = compact(case, torch.float32)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args, t32, SCALE)
    k_dt, v_dt, t_dt = compact(case, dtype)
    ref_dt = paged_prefill_attention_ref(case.q, k_dt, v_dt, *args, t_dt, SCALE)
    assert_within_budget(out, ref32, ref_dt, name)


def test_huge_block_ids_real_shapes():
    # 16 x 8 x 128 = 16384 elements a block: ids >= 2**17 put every offset past 2**31 elements.
    # Two 4.3 GB caches, allocated but written only where used.
    first = 2**17
    case = make_case([1, 300, 1], [40, 300, 5000], HEADS, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                     first_block=first, num_blocks=first + 400, write_new=False, seed=13)
    k_want, v_want = case.k_cache[first:].clone(), case.v_cache[first:].clone()
    write_kv_cache_ref(case.k, case.v, k_want, v_want, case.slot_mapping - first * 16)
    write_kv_cache(case.k, case.v, case.k_cache, case.v_cache, case.slot_mapping)
    assert torch.equal(case.k_cache[first:].nan_to_num(), k_want.nan_to_num())
    assert torch.equal(case.v_cache[first:].nan_to_num(), v_want.nan_to_num())
    args = (case.query_start_loc, case.seq_lens)
    out = poisoned_like(case.q)
    paged_prefill_attention(case.q, case.k_cache, case.v_cache, *args, case.block_tables, SCALE,
                            case.max_query_len, out)
    k32, v32, t32 = compact(case, torch.float32)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args, t32, SCALE)
    k_dt, v_dt, t_dt = compact(case, torch.bfloat16)
    ref_dt = paged_prefill_attention_ref(case.q, k_dt, v_dt, *args, t_dt, SCALE)
    assert_within_budget(out, ref32, ref_dt, "prefill")
    last = (case.query_start_loc[1:] - 1).long()
    out_d = paged_decode_attention(case.q[last].contiguous(), case.k_cache, case.v_cache,
                                   case.block_tables, case.seq_lens, SCALE, num_splits=4)
    assert_within_budget(out_d, ref32[last], ref_dt[last], "decode")


@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_triton_backend_real_shapes(step):
    query_lens, seq_lens = ([1] * 48, _lens(48, 3000, 3)) if step == "decode" else (
        [1] * 40 + [700, 64], _lens(40, 3000, 4) + [1500, 64])
    case = make_case(query_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                     write_new=False, pad_tokens=3, seed=14)
    md = AttentionMetadata(case.slot_mapping, case.query_start_loc, case.seq_lens, case.block_tables,
                           max(query_lens), max(seq_lens), tuple(query_lens), tuple(seq_lens))
    backend = TritonAttentionBackend(HEADS, KV_HEADS, HEAD_DIM, SCALE)
    backend.plan(md)
    out = backend.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)
    n = case.num_real_tokens
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))  # padding tokens
    args = (case.query_start_loc, case.seq_lens)
    k32, v32, t32 = compact(case, torch.float32)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args, t32, SCALE)
    k_dt, v_dt, t_dt = compact(case, torch.bfloat16)
    ref_dt = paged_prefill_attention_ref(case.q, k_dt, v_dt, *args, t_dt, SCALE)
    assert_within_budget(out[:n], ref32[:n], ref_dt[:n], step)
