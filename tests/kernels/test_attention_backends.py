"""Both attention backends, through plan() + forward(), against the kernel references."""
import pytest
import torch

from engine.attention.base import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend
from kernels.kv_cache_write import write_kv_cache_ref
from kernels.paged_prefill_attention import paged_prefill_attention_ref
from tests.kernels.paged_case import assert_within_budget, compact, make_case

STEPS = {
    # name: (query_lens, seq_lens)
    "decode": ([1, 1, 1, 1, 1], [37, 1, 16, 130, 5]),
    "prefill": ([21, 40, 7], [21, 90, 40]),  # a whole prompt, chunks after a cached prefix
    "mixed": ([1, 33, 1, 3, 1], [37, 33, 1, 19, 64]),
}


def _metadata(case) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=case.slot_mapping,
        query_start_loc=case.query_start_loc,
        seq_lens=case.seq_lens,
        block_tables=case.block_tables,
        max_query_len=max(case.query_lens),
        max_seq_len=max(case.context_lens),
        query_lens_cpu=tuple(case.query_lens),
        seq_lens_cpu=tuple(case.context_lens),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("backend_cls", [TorchAttentionBackend, TritonAttentionBackend])
def test_backend_writes_then_attends(backend_cls, step, dtype):
    num_heads, num_kv_heads, head_dim = 8, 2, 64
    query_lens, seq_lens = STEPS[step]
    case = make_case(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype=dtype,
                     write_new=False, pad_tokens=2, seed=7)
    # What the cache must hold after the step, and the attention over it.
    k_want, v_want = case.k_cache.clone(), case.v_cache.clone()
    write_kv_cache_ref(case.k, case.v, k_want, v_want, case.slot_mapping)

    backend = backend_cls(num_heads, num_kv_heads, head_dim, head_dim**-0.5)
    backend.plan(_metadata(case))
    out = backend.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)

    def same(a, b):
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

    assert same(case.k_cache, k_want) and same(case.v_cache, v_want)
    n = case.num_real_tokens
    scale = head_dim**-0.5
    args = (case.query_start_loc, case.seq_lens)
    k32, v32, t32 = compact(case, torch.float32)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args, t32, scale)
    k_dt, v_dt, t_dt = compact(case, dtype)
    ref_dt = paged_prefill_attention_ref(case.q, k_dt, v_dt, *args, t_dt, scale)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert_within_budget(out[:n], ref32[:n], ref_dt[:n], f"{backend_cls.name} {step}")


def test_torch_backend_gqa_5_to_1_head_dim_128():
    query_lens, seq_lens = STEPS["mixed"]
    case = make_case(query_lens, seq_lens, 5, 1, 128, write_new=False, seed=8)
    backend = TorchAttentionBackend(5, 1, 128, 0.1)
    backend.plan(_metadata(case))
    out = backend.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)
    k32, v32, t32 = compact(case, torch.float32)
    ref = paged_prefill_attention_ref(case.q, k32, v32, case.query_start_loc, case.seq_lens, t32, 0.1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
