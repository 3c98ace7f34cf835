"""W4A16 GEMM: `y[M, N] = x[M, K] @ W[K, N]` with W stored as 4-bit groups, dequantized in
registers: `W[k, n] = (q[k, n] - z[k // GROUP, n]) * s[k // GROUP, n]`.

Layout (what engine/quant converts AWQ and GPTQ checkpoints into at load):
* `qweight` int32 `[K // 8, N]`: nibble j (bits 4j..4j+3) of word (r, n) is q[8r + j, n]
  (GPTQ's order; AWQ's column-packed, interleaved words are repacked once at load);
* `scales` `[G, N]` in x's dtype, `zeros` uint8 `[G, N]` (G = ceil(K / GROUP)).
A GPTQ act-order (desc_act) checkpoint has its rows sorted by group at load; the layer gathers
x's columns by the same permutation before calling this kernel.

Design
------
* A program owns a [BLOCK_M, BLOCK_N] output tile and walks K in BLOCK_K steps: it loads the
  [BLOCK_K // 8, BLOCK_N] packed words once, broadcasts each word to its 8 rows, shifts and masks
  to get the nibbles, subtracts the zero point and multiplies by the scale in fp32, rounds to x's
  dtype and feeds `tl.dot` (fp32 accumulator). The weight stream is 4x smaller than bf16's,
  which is the whole point at decode, where the GEMM is bound by reading weights.
* When BLOCK_K divides GROUP a tile lies inside one group: one scale / zero row per tile
  (`GROUP_ALIGNED`); otherwise each row gathers its own group's row.
* Two tile families (`W4A16Config`): decode-sized (M <= 16: BLOCK_M 16, narrow N tiles, long K
  steps, split-K when the N tiles alone cannot fill the GPU: fp32 partials summed after) and
  prefill-sized (BLOCK_M 64, BLOCK_N 128, no split).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class W4A16Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K] activations, rows contiguous
    qw_ptr,  # [K // 8, N] int32, 8 nibbles along K per word
    s_ptr,  # [G, N] scales, x's dtype
    z_ptr,  # [G, N] uint8 zero points
    y_ptr,  # [SPLIT_K, M, N]: fp32 partials when SPLIT_K > 1, else y itself [M, N]
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_qk, stride_sg, stride_zg, stride_ym, stride_ys,
    GROUP: tl.constexpr, GROUP_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows = tl.arange(0, BLOCK_K)
    shifts = ((rows % 8) * 4)[:, None]  # [BLOCK_K, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + rows
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(qw_ptr + words[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=(words[:, None] < tl.cdiv(K, 8)) & mask_n[None, :], other=0)  # [BLOCK_K // 8, BLOCK_N]
        packed = tl.reshape(tl.broadcast_to(packed[:, None, :], (BLOCK_K // 8, 8, BLOCK_N)), (BLOCK_K, BLOCK_N))
        q = (packed >> shifts) & 0xF  # [BLOCK_K, BLOCK_N]
        if GROUP_ALIGNED:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * stride_zg + offs_n, mask=mask_n, other=0).to(tl.int32)[None, :]
        else:
            g = offs_k // GROUP
            gmask = mask_k[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + g[:, None].to(tl.int64) * stride_sg + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None].to(tl.int64) * stride_zg + offs_n[None, :], mask=gmask, other=0).to(tl.int32)
        w = ((q - z).to(tl.float32) * s).to(x.dtype)  # rows past K meet zeros in x
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    y_ptrs = y_ptr + pid_k.to(tl.int64) * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


DECODE_MAX_M = 16


def pick_config(M: int, N: int, K: int, sm_count: int = 132) -> W4A16Config:
    """Decode tiles for M <= 16 (split-K until ~2 programs per SM), prefill tiles above."""
    if M <= DECODE_MAX_M:
        block_n, block_k = 64, 128
        programs = triton.cdiv(N, block_n)
        split = max(1, min(2 * sm_count // programs, triton.cdiv(K, block_k * 4)))
        return W4A16Config(16, block_n, block_k, split_k=split, num_warps=4, num_stages=4)
    return W4A16Config(64, 128, 64, num_warps=4, num_stages=3)


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
    assert x.dim() == 2 and qweight.dim() == 2, (tuple(x.shape), tuple(qweight.shape))
    K, N = x.shape[1], qweight.shape[1]
    assert K % 8 == 0 and qweight.shape[0] == K // 8, f"qweight {tuple(qweight.shape)} for K = {K}"
    assert group_size % 8 == 0 and group_size > 0, group_size
    groups = triton.cdiv(K, group_size)
    assert scales.shape == (groups, N) and zeros.shape == (groups, N), (tuple(scales.shape), tuple(zeros.shape), groups, N)
    assert qweight.dtype == torch.int32 and zeros.dtype == torch.uint8, (qweight.dtype, zeros.dtype)
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32) and scales.dtype == x.dtype, (x.dtype, scales.dtype)
    assert x.stride(1) == 1, f"x rows must be contiguous, strides {x.stride()}"
    for t in (qweight, scales, zeros):
        assert t.stride(1) == 1 and t.device == x.device, (t.stride(), t.device, x.device)


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: W4A16Config | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight) [K, N] -> [M, N] in x's dtype."""
    _check(x, qweight, scales, zeros, group_size)
    M, K = x.shape
    N = qweight.shape[1]
    config = config or pick_config(M, N, K)
    assert config.block_k % 8 == 0 and config.block_k >= 16, config
    k_per_split = triton.cdiv(triton.cdiv(K, config.split_k), config.block_k) * config.block_k
    split = triton.cdiv(K, k_per_split)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n), split)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, out, M, N, K, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(-2),
        out.stride(0) if split > 1 else 0,
        GROUP=group_size, GROUP_ALIGNED=group_size % config.block_k == 0,  # K tiles start at multiples of BLOCK_K
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, IEEE=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return y if split == 1 else out.sum(0).to(x.dtype)


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K // 8, N] -> int32 [K, N] nibbles (row 8r + j = nibble j of row r)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    nibbles = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K // 8, 8, N]
    return nibbles.reshape(-1, qweight.shape[1])


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [K, N] = (q - z) * s per group, computed in fp32, returned in `dtype` (scales' dtype)."""
    q = unpack_rows(qweight)
    groups = torch.arange(q.shape[0], device=q.device) // group_size
    w = (q - zeros.to(torch.int32)[groups]).float() * scales.float()[groups]
    return w.to(dtype or scales.dtype)


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """The same product in plain torch: dequantize to x's dtype, then matmul."""
    return x @ dequantize(qweight, scales, zeros, group_size, x.dtype)


def w4a16_bytes(M: int, N: int, K: int, group_size: int, dtype: torch.dtype = torch.float16) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    groups = -(-K // group_size)
    return K * N // 2 + groups * N * (elem + 1) + (M * K + M * N) * elem


if __name__ == "__main__":  # python -m kernels.w4a16_gemm: us per call and TB/s vs bf16 cuBLAS (CUDA)
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 256, 2048])
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    shapes = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    print(f"{'shape':>8} {'M':>5} {'w4a16 us':>9} {'TB/s':>6} {'bf16 us':>8} {'speedup':>7}")
    for name, (N, K) in shapes.items():
        g = args.group_size
        qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda")
        scales = torch.rand(K // g, N, dtype=torch.float16, device="cuda") / 64
        zeros = torch.randint(0, 16, (K // g, N), dtype=torch.uint8, device="cuda")
        w16 = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
        for M in args.m:
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            ours = triton.testing.do_bench(lambda: w4a16_gemm(x, qweight, scales, zeros, g)) * 1e3
            xb = x.to(torch.bfloat16)
            dense = triton.testing.do_bench(lambda: torch.nn.functional.linear(xb, w16)) * 1e3
            tbs = w4a16_bytes(M, N, K, g) / ours / 1e6
            print(f"{name:>8} {M:>5} {ours:9.1f} {tbs:6.2f} {dense:8.1f} {dense / ours:7.2f}")
