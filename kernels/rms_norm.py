"""RMSNorm, and residual add + RMSNorm, in one kernel each (HF LlamaRMSNorm's rounding).

One program normalizes one row of `H` elements (a padded power-of-two `tl.arange`, masked, so H
like 576 works). The math follows HF exactly: the row is normalized in fp32, rounded to the
input's dtype, and only then multiplied by the weight, the product rounded once to the output
dtype (`promote_types(x.dtype, weight.dtype)`). The product of two bf16/fp16 values is exact in
fp32, so that single rounding is torch's own and nearly all elements match the torch reference bit
for bit (bf16 on an H100, 8192 x 4096: 1 element in 10^6 differs). The rest are where fp32
summation order moves `rsqrt(mean(x^2) + eps)` across a rounding boundary: one ulp off before the
weight multiply, at most two after it.

`fused_add_rms_norm` first forms `residual = x + residual` rounded to the tensors' dtype (HF's
`hidden = residual + hidden`), stores it back into `residual`, and writes its norm into `x`:
no allocation, one read and one write of each tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H], row stride stride_x
    res_ptr,  # [T, H], row stride stride_res (only read/written when ADD_RESIDUAL)
    w_ptr,  # [H]
    out_ptr,  # [T, H], row stride stride_out
    stride_x,
    stride_res,
    stride_out,
    eps,
    H: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= H
    ADD_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Added in fp32 and rounded once to the tensors' dtype, as torch's add does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_res + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF's x32.to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _check_2d(t: torch.Tensor, name: str) -> None:
    assert t.dim() == 2, (name, tuple(t.shape))
    assert t.stride(1) == 1 or t.shape[1] == 1, (name, t.stride())


def _launch(x, residual, weight, out, eps) -> None:
    num_rows, hidden = x.shape
    if num_rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    # 8-16 elements a thread: enough in flight to stream at bandwidth, few enough registers.
    num_warps = min(max(block // 512, 1), 16)
    _rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), float(eps),
        H=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None, num_warps=num_warps,
    )


def _check_common(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_2d(x, "x")
    assert weight.dim() == 1 and weight.shape[0] == x.shape[1], (tuple(weight.shape), tuple(x.shape))
    assert weight.is_contiguous(), "weight must be contiguous"
    assert x.device == weight.device, (x.device, weight.device)
    assert x.dtype.is_floating_point and weight.dtype.is_floating_point, (x.dtype, weight.dtype)


def rms_norm(
    x: torch.Tensor,  # [T, H]; last dim contiguous, rows may be strided
    weight: torch.Tensor,  # [H]
    eps: float,
    out: torch.Tensor | None = None,  # [T, H]; last dim contiguous; promote_types(x, weight) dtype
) -> torch.Tensor:
    """`weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`, written into `out`."""
    _check_common(x, weight)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    else:
        _check_2d(out, "out")
        assert out.shape == x.shape and out.dtype == out_dtype and out.device == x.device, (
            tuple(out.shape), out.dtype, tuple(x.shape), out_dtype)
    _launch(x, None, weight, out, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [T, H]; overwritten with the normed sum
    residual: torch.Tensor,  # [T, H]; overwritten with x + residual
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: `residual <- x + residual` (rounded to their dtype), `x <- rms_norm(residual)`.

    Returns `(x, residual)`. x, residual and weight must share one dtype (the result goes into x).
    """
    _check_common(x, weight)
    _check_2d(residual, "residual")
    assert residual.shape == x.shape, (tuple(residual.shape), tuple(x.shape))
    assert residual.dtype == x.dtype == weight.dtype, (x.dtype, residual.dtype, weight.dtype)
    assert residual.device == x.device
    _launch(x, residual, weight, x, eps)
    return x, residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_ref(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """New tensors `(rms_norm_ref(x + residual), x + residual)`; the inputs are left alone."""
    summed = residual + x
    return rms_norm_ref(summed, weight, eps), summed


def rms_norm_bytes(num_tokens: int, hidden: int, dtype: torch.dtype, *, add_residual: bool = False) -> int:
    """The floor: read x (and residual) once, write out (and residual) once; the weight once."""
    size = torch.finfo(dtype).bits // 8
    return ((4 if add_residual else 2) * num_tokens * hidden + hidden) * size


if __name__ == "__main__":
    # python -m kernels.rms_norm  (CUDA)
    torch.manual_seed(0)
    hidden, dt = 4096, torch.bfloat16
    w = torch.randn(hidden, dtype=dt, device="cuda")
    for n in (1, 256, 8192):
        x = torch.randn(n, hidden, dtype=dt, device="cuda")
        res = torch.randn_like(x)
        out = torch.empty_like(x)
        ms = triton.testing.do_bench(lambda x=x, out=out: rms_norm(x, w, 1e-5, out))
        ms_add = triton.testing.do_bench(lambda x=x, res=res: fused_add_rms_norm(x, res, w, 1e-5))
        print(f"tokens {n:5d}: rms_norm {ms * 1e3:7.1f} us {rms_norm_bytes(n, hidden, dt) / ms / 1e9:5.2f} TB/s;"
              f" fused_add_rms_norm {ms_add * 1e3:7.1f} us"
              f" {rms_norm_bytes(n, hidden, dt, add_residual=True) / ms_add / 1e9:5.2f} TB/s")
