"""SiLU-and-multiply for the fused gate/up projection: `out = silu(x[:, :I]) * x[:, I:]`.

Grid (rows, column tiles of BLOCK). Rounding follows torch's `F.silu(gate) * up` in x's dtype:
silu is computed in fp32 and rounded to x's dtype, then multiplied by `up` in fp32 (exact for
bf16/fp16 operands) and rounded once more. Results match the reference bit for bit except where
Triton's fp32 `exp` differs from torch's by an ulp right at a rounding boundary of the narrow
dtype (rare), and in fp32 by a few ulps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 * I], row stride stride_x
    out_ptr,  # [T, I], row stride stride_out
    stride_x,
    stride_out,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)  # F.silu's rounding
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [T, 2 * I]: gate then up; last dim contiguous, rows may be strided
    out: torch.Tensor | None = None,  # [T, I], x's dtype; last dim contiguous
) -> torch.Tensor:
    assert x.dim() == 2 and x.shape[1] % 2 == 0, tuple(x.shape)
    assert x.stride(1) == 1, x.stride()
    assert x.dtype.is_floating_point, x.dtype
    num_rows, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    else:
        assert out.shape == (num_rows, inter) and out.dtype == x.dtype and out.device == x.device, (
            tuple(out.shape), out.dtype, tuple(x.shape), x.dtype)
        assert out.stride(1) == 1 or inter == 1, out.stride()
    if num_rows == 0 or inter == 0:
        return out
    # Few rows (decode): small tiles, so even one row spreads over many SMs. Many rows: 1024-wide
    # tiles of 8 elements a thread (16-byte accesses in bf16), fewer programs to schedule.
    block = min(triton.next_power_of_2(inter), 256 if num_rows <= 16 else 1024)
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4 if block >= 1024 else 2,
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_bytes(num_tokens: int, intermediate: int, dtype: torch.dtype) -> int:
    """The floor: read gate and up once, write out once."""
    return 3 * num_tokens * intermediate * torch.finfo(dtype).bits // 8


if __name__ == "__main__":
    # python -m kernels.activation  (CUDA)
    torch.manual_seed(0)
    inter, dt = 14336, torch.bfloat16
    for n in (1, 256, 8192):
        x = torch.randn(n, 2 * inter, dtype=dt, device="cuda")
        out = torch.empty(n, inter, dtype=dt, device="cuda")
        ms = triton.testing.do_bench(lambda x=x, out=out: silu_and_mul(x, out))
        ref_ms = triton.testing.do_bench(lambda x=x: silu_and_mul_ref(x))
        print(f"tokens {n:5d}: {ms * 1e3:7.1f} us {silu_and_mul_bytes(n, inter, dt) / ms / 1e9:5.2f} TB/s"
              f" (torch {ref_ms * 1e3:7.1f} us)")
