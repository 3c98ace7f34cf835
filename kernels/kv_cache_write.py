"""Write a step's new K/V vectors into the paged cache.

One program copies one token's `num_kv_heads * head_dim` elements of K and of V to its slot
(`block_id * block_size + offset`); a negative slot marks padding and is skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_cache_write_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_key_t,
    stride_value_t,
    stride_cache_block,
    stride_cache_offset,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    ROW_PAD: tl.constexpr,  # next power of two >= ROW
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    cols = tl.arange(0, ROW_PAD)
    mask = cols < ROW
    dst = block * stride_cache_block + offset * stride_cache_offset + cols
    src_t = token.to(tl.int64)
    k = tl.load(key_ptr + src_t * stride_key_t + cols, mask=mask)
    v = tl.load(value_ptr + src_t * stride_value_t + cols, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_rows(x: torch.Tensor, name: str) -> None:
    # Each token's [num_kv_heads, head_dim] must be one contiguous row (a qkv split keeps that).
    assert x.dim() == 3, (name, x.shape)
    assert x.stride(2) == 1 and x.stride(1) == x.shape[2], (name, x.stride())


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; < 0 = padding
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, key.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert slot_mapping.dtype == torch.int64 and slot_mapping.shape == (num_tokens,)
    assert slot_mapping.is_contiguous()
    _check_rows(key, "key")
    _check_rows(value, "value")
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    _kv_cache_write_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0), k_cache.stride(0), k_cache.stride(1),
        BLOCK_SIZE=k_cache.shape[1], ROW=row, ROW_PAD=triton.next_power_of_2(row),
        num_warps=4 if row >= 1024 else 1,
    )


def write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


def kv_write_bytes(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The floor: read K and V once and write them once."""
    return 4 * num_tokens * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


if __name__ == "__main__":
    # python -m kernels.kv_cache_write  (CUDA)
    torch.manual_seed(0)
    kv, d, bs, dt = 8, 128, 16, torch.bfloat16
    num_blocks = 8192
    k_cache = torch.zeros(num_blocks, bs, kv, d, dtype=dt, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    for n in (256, 4096, 16384):
        key = torch.randn(n, kv, d, dtype=dt, device="cuda")
        value = torch.randn_like(key)
        slots = torch.randperm((num_blocks - 1) * bs, device="cuda")[:n] + bs
        ms = triton.testing.do_bench(lambda: write_kv_cache(key, value, k_cache, v_cache, slots))
        tbs = kv_write_bytes(n, kv, d, dt) / ms / 1e9
        print(f"tokens {n:6d}: {ms * 1e3:8.1f} us  {tbs:5.2f} TB/s")
