"""FP8 (e4m3) W8A8 linear layers: per-output-channel weight scales, per-token dynamic (or one
static) activation scale; y = (x_q @ w_q^T) * x_scale * w_scale^T, accumulated in fp32.

On CUDA with compute capability >= 8.9 (Ada, Hopper) the GEMM is `torch._scaled_mm` (row-wise
scales); older GPUs are refused with a clear error. On CPU the same arithmetic runs by
dequantizing both operands to fp32 (the fp8 products are exact in fp32), so results match
`torch._scaled_mm` to fp32 rounding and every engine test runs here.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.quant.params import copy_checked, loaded_param

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_MIN_SCALE = 1e-12  # an all-zero row still gets a finite scale


def check_fp8_device(device: torch.device) -> None:
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise RuntimeError(f"--quantization fp8 needs an FP8 GPU (compute capability >= 8.9: Ada, Hopper or "
                           f"newer); {name} is {major}.{minor}. Run unquantized, or use awq / gptq")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], fp32 scales [N, 1]) with w ~= q * scale, each row's max at 448."""
    scale = (w.float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_token(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]); `scale_ub` caps a row's max |x| (fbgemm)."""
    amax = x.float().abs().amax(dim=1, keepdim=True)
    if scale_ub is not None:
        amax = amax.clamp_max(scale_ub)
    scale = (amax / FP8_MAX).clamp_min(_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] with one fp32 scale [1] -> (e4m3 [M, K], scales [M, 1])."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(1, 1).expand(x.shape[0], 1)


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] e4m3, x_scale [M, 1] fp32, wq [N, K] e4m3, w_scale [N, 1] fp32 -> [M, N] out_dtype."""
    assert xq.dtype == FP8 and wq.dtype == FP8, (xq.dtype, wq.dtype)
    assert xq.shape[1] == wq.shape[1], (tuple(xq.shape), tuple(wq.shape))
    assert x_scale.shape == (xq.shape[0], 1) and w_scale.shape == (wq.shape[0], 1), (x_scale.shape, w_scale.shape)
    if not xq.is_cuda:
        return fp8_gemm_ref(xq, x_scale, wq, w_scale, bias, out_dtype)
    # Row-wise scaled_mm writes bf16; fp16 / fp32 models get a cast of that.
    y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale.contiguous(), scale_b=w_scale.t().contiguous(),
                         out_dtype=torch.bfloat16, use_fast_accum=True)
    y = y if out_dtype == torch.bfloat16 else y.to(out_dtype)
    return y if bias is None else y + bias


def fp8_gemm_ref(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    y = (xq.float() @ wq.float().t()) * x_scale * w_scale.t()
    y = y if bias is None else y + bias.float()
    return y.to(out_dtype)


class Fp8Linear(nn.Module):
    """y = x @ W^T with W in e4m3. `parts`: output sizes of the checkpoint tensors fused into this
    layer (q, k, v or gate, up); each part's scales arrive separately and are kept per channel."""

    def __init__(self, in_features: int, out_features: int, parts: list[int], *, bias: nn.Parameter | None = None,
                 static_input_scale: bool = False, scale_ub: float | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        self.scale_ub = scale_ub
        self.weight = loaded_param(torch.zeros(out_features, in_features, dtype=FP8, device=device), self._load_rows)
        self.weight_scale = loaded_param(torch.ones(out_features, 1, dtype=torch.float32, device=device), self._load_scale)
        self.input_scale = (loaded_param(torch.zeros(1, dtype=torch.float32, device=device), self._load_input_scale)
                            if static_input_scale else None)
        self.bias = bias

    @classmethod
    def from_dense(cls, linear: nn.Linear, scale_ub: float | None = None) -> "Fp8Linear":
        """Quantizes a loaded bf16/fp16/fp32 layer (per output channel)."""
        layer = cls(linear.in_features, linear.out_features, [linear.out_features], bias=linear.bias,
                    scale_ub=scale_ub, device=linear.weight.device)
        q, scale = quantize_per_channel(linear.weight.data)
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            xq, xs = quantize_per_token(rows, self.scale_ub)
        else:
            xq, xs = quantize_static(rows, self.input_scale)
        y = fp8_gemm(xq, xs, self.weight, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ---- checkpoint tensors (offset / size: this part's output rows; size None = all) ----------
    def _load_rows(self, tensor: torch.Tensor, offset: int, size: int | None) -> None:
        dst = self.weight.data if size is None else self.weight.data.narrow(0, offset, size)
        if tensor.dtype != FP8:
            raise ValueError(f"fp8 checkpoint weight has dtype {tensor.dtype}, expected {FP8}")
        copy_checked(dst, tensor, "weight")

    def _load_scale(self, tensor: torch.Tensor, offset: int, size: int | None) -> None:
        dst = self.weight_scale.data if size is None else self.weight_scale.data.narrow(0, offset, size)
        scale = tensor.float().reshape(-1, 1)
        if scale.shape[0] == 1:  # per-tensor scale: the same for every row of this part
            scale = scale.expand(dst.shape[0], 1)
        copy_checked(dst, scale, "weight_scale")

    def _load_input_scale(self, tensor: torch.Tensor, offset: int, size: int | None) -> None:
        if tensor.numel() != 1:
            raise ValueError(f"input_scale must be one value per layer, got shape {tuple(tensor.shape)}")
        # Fused parts share their input: the largest scale covers all of them (as vLLM does).
        self.input_scale.data.copy_(torch.maximum(self.input_scale.data, tensor.float().reshape(1).to(self.input_scale.device)))

