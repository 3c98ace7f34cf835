import pytest
import torch

from kernels.kv_cache_write import write_kv_cache, write_kv_cache_ref
from tests.kernels.paged_case import DEVICE, make_case


def _same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(4, 64), (2, 128), (1, 64)])
def test_write_matches_ref(dtype, num_kv_heads, head_dim):
    # Mixed rows, lengths off the block size, a prefix already cached, two padding tokens.
    case = make_case([1, 9, 23, 1], [5, 9, 40, 17], num_kv_heads, num_kv_heads, head_dim,
                     dtype=dtype, write_new=False, pad_tokens=2, seed=1)
    assert (case.slot_mapping < 0).sum() == 2
    k_ref, v_ref = case.k_cache.clone(), case.v_cache.clone()
    write_kv_cache_ref(case.k, case.v, k_ref, v_ref, case.slot_mapping)
    write_kv_cache(case.k, case.v, case.k_cache, case.v_cache, case.slot_mapping)
    assert _same(case.k_cache, k_ref) and _same(case.v_cache, v_ref)
    # Every real slot now holds its token; padding wrote nothing (block 0 is still all NaN).
    real = case.slot_mapping[: case.num_real_tokens]
    flat = case.k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[real], case.k[: case.num_real_tokens])
    assert case.k_cache[0].isnan().all() and case.v_cache[0].isnan().all()


def test_write_from_strided_qkv_split():
    # K and V as views into a fused qkv projection output: rows contiguous, tokens strided.
    num_tokens, kv, d = 7, 2, 64
    qkv = torch.randn(num_tokens, (4 + 2 * kv) * d, device=DEVICE)
    k = qkv[:, 4 * d : (4 + kv) * d].view(num_tokens, kv, d)
    v = qkv[:, (4 + kv) * d :].view(num_tokens, kv, d)
    k_cache = torch.full((6, 16, kv, d), float("nan"), device=DEVICE)
    v_cache = k_cache.clone()
    slots = torch.randperm(5 * 16, device=DEVICE)[:num_tokens] + 16
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, kv, d)[slots], k)
    assert torch.equal(v_cache.view(-1, kv, d)[slots], v)
    assert k_cache.isnan().sum() == k_cache.numel() - num_tokens * kv * d


def test_write_rejects_bad_inputs():
    k = torch.randn(3, 2, 64, device=DEVICE)
    cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    with pytest.raises(AssertionError):
        write_kv_cache(k, k, cache, cache, torch.arange(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(AssertionError):
        write_kv_cache(k.transpose(1, 2).contiguous().transpose(1, 2), k, cache, cache,
                       torch.arange(3, device=DEVICE))
