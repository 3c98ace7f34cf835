"""Write a step's new K/V vectors into the paged cache.

One program copies one token's `num_kv_heads * head_dim` elements of K and of V to its slot
(`block_id * block_size + offset`); a negative slot marks padding and is skipped.

An fp8 cache (float8 e4m3fn) stores `clamp(x * (1 / scale), -448, 448)` rounded to nearest
even, one static scale for K and one for V: the product in fp32 with the reciprocal computed once
on the host, so this kernel and the torch path (`quantize_fp8`) store the same bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value; writes saturate there (a plain cast may give NaN)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def fp32_reciprocal(scale: float) -> float:
    """1 / scale, rounded to fp32 as the kernel receives it."""
    return float(torch.tensor(1.0 / scale, dtype=torch.float32))


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as saturated e4m3fn, the torch path of the cache write (the same bytes as the
    kernel's)."""
    inv = torch.tensor(fp32_reciprocal(scale), dtype=torch.float32, device=x.device)
    return (x.float() * inv).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """e4m3fn -> dtype, times scale (exact for scale 1.0 or any power of two)."""
    out = x.to(dtype)
    return out if scale == 1.0 else out.mul_(scale)


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
    inv_k_scale,  # fp32: 1 / k_scale; used by an fp8 cache only
    inv_v_scale,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    ROW_PAD: tl.constexpr,  # next power of two >= ROW
    FP8: tl.constexpr,  # the cache is float8 e4m3: scale and saturate
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
    if FP8:
        k = tl.minimum(tl.maximum(k.to(tl.float32) * inv_k_scale, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * inv_v_scale, -448.0), 448.0)
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
    k_scale: float = 1.0,  # fp8 cache only: stored = k / k_scale (saturated)
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (value.shape, key.shape)
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_scale > 0 and v_scale > 0, (k_scale, v_scale)
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
        fp32_reciprocal(k_scale), fp32_reciprocal(v_scale),
        BLOCK_SIZE=k_cache.shape[1], ROW=row, ROW_PAD=triton.next_power_of_2(row), FP8=is_fp8(k_cache.dtype),
        num_warps=4 if row >= 1024 else 1,
    )


def write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if is_fp8(k_cache.dtype):
        key, value = quantize_fp8(key, k_scale), quantize_fp8(value, v_scale)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


def kv_write_bytes(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The floor: read K and V once and write them once (in `dtype` both ways)."""
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
