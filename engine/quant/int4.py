"""4-bit group-quantized (W4A16) linear layers read from AWQ and GPTQ checkpoints.

Checkpoint layouts (HF hub conventions), W[n, k] = (q - z) * s for input k of group g(k):
* AWQ (AutoAWQ "gemm"): qweight int32 [K, N // 8] and qzeros int32 [G, N // 8] packed along the
  output dim, 8 nibbles a word in the interleaved order AWQ_ORDER (nibble i holds column
  AWQ_ORDER[i] of its 8); scales [G, N]; g(k) = k // group_size.
* GPTQ (AutoGPTQ, checkpoint_format "gptq"): qweight int32 [K // 8, N] packed along the input dim
  in order; qzeros int32 [G, N // 8] packed along the output dim in order and stored minus one
  (the v1 format: the zero point is stored + 1); scales [G, N]; g_idx int32 [K] the group of each
  input (k // group_size, or an activation-order permutation's groups with desc_act).

Fused layers (qkv, gate_up) concatenate their parts along the output dim as they load. After
loading, `finalize()` converts both into the kernel's layout (kernels/w4a16_gemm.py): qweight
[K // 8, N] packed along K, scales [G, N] in the model dtype, zeros uint8 [G, N]; a non-trivial
g_idx becomes a row permutation (rows sorted by group, x's columns gathered the same way).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.quant.config import QuantConfig
from engine.quant.params import copy_checked, loaded_param
from kernels.w4a16_gemm import unpack_rows, w4a16_gemm, w4a16_gemm_ref

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of a word sits in nibble AWQ_REVERSE[j]
PACK = 8  # 4-bit values per int32


def _shifts(device) -> torch.Tensor:
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def unpack_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C // 8] -> int32 [R, C]; `order` = AWQ_REVERSE for AWQ's interleaved words."""
    nibbles = (packed[..., None] >> _shifts(packed.device)) & 0xF  # [R, C // 8, 8]: nibble i
    if order is not None:
        nibbles = nibbles[..., list(order)]
    return nibbles.reshape(packed.shape[0], -1)


def pack_cols(values: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int [R, C] in 0..15 -> int32 [R, C // 8]; `order` = AWQ_ORDER for AWQ's interleaved words."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, PACK)
    if order is not None:
        v = v[..., list(order)]
    return _to_int32((v << _shifts(values.device).to(torch.int64)).sum(-1))


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """int [K, N] in 0..15 -> int32 [K // 8, N], row 8r + j in nibble j of row r."""
    v = values.to(torch.int64).reshape(-1, PACK, values.shape[1])
    return _to_int32((v << _shifts(values.device).to(torch.int64)[None, :, None]).sum(1))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class Int4Linear(nn.Module):
    """y = x @ W^T with W 4-bit group-quantized (AWQ or GPTQ checkpoint), bias optional."""

    def __init__(self, in_features: int, out_features: int, quant: QuantConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", bias: nn.Parameter | None = None):
        super().__init__()
        K, N = in_features, out_features
        self.group_size = K if quant.group_size == -1 else quant.group_size
        if K % PACK or N % PACK:
            raise ValueError(f"{quant.method}: layer {K} -> {N} features is not a multiple of {PACK}")
        if quant.method == "awq" and K % self.group_size:
            raise ValueError(f"awq: {K} input features are not a multiple of group_size {self.group_size}")
        self.in_features, self.out_features, self.method, self.dtype = K, N, quant.method, dtype
        groups = -(-K // self.group_size)

        def param(shape, dt, cols_per_value):
            t = torch.zeros(shape, dtype=dt, device=device)
            return loaded_param(t, lambda src, off, size: self._load_cols(t, src, off, size, cols_per_value))

        if quant.method == "awq":
            self.qweight = param((K, N // PACK), torch.int32, PACK)
        else:
            self.qweight = param((K // PACK, N), torch.int32, 1)
            self.g_idx = loaded_param(torch.zeros(K, dtype=torch.int32, device=device), self._load_g_idx)
            self._g_idx_seen = False
        self.qzeros = param((groups, N // PACK), torch.int32, PACK)
        self.scales = param((groups, N), dtype, 1)
        self.bias = bias
        self.register_buffer("perm", None, persistent=False)  # gather of x's columns (act-order GPTQ)
        self.register_parameter("zeros", None)  # uint8 [G, N], set by finalize()

    # ---- checkpoint tensors: the output dim is dim 1; `cols_per_value` output columns per element
    def _load_cols(self, dst, src, offset, size, cols_per_value) -> None:
        if size is not None:
            if offset % cols_per_value or size % cols_per_value:
                raise ValueError(f"fused part at rows {offset}..{offset + size} is not aligned to {cols_per_value}")
            dst = dst.narrow(1, offset // cols_per_value, size // cols_per_value)
        copy_checked(dst, src.to(dst.dtype) if src.is_floating_point() else src, self.method)

    def _load_g_idx(self, src, offset, size) -> None:
        if self._g_idx_seen and not torch.equal(self.g_idx.data, src.to(self.g_idx.device, torch.int32)):
            raise ValueError("gptq: the parts of a fused layer (q/k/v or gate/up) have different g_idx; "
                             "such a checkpoint is not supported")
        copy_checked(self.g_idx.data, src.to(torch.int32), "g_idx")
        self._g_idx_seen = True

    # ---- after loading -------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        """Checkpoint layout -> kernel layout (see module docstring)."""
        if self.method == "awq":
            q = unpack_cols(self.qweight.data, AWQ_REVERSE)  # [K, N]
            zeros = unpack_cols(self.qzeros.data, AWQ_REVERSE)
        else:
            q = unpack_rows(self.qweight.data)
            zeros = unpack_cols(self.qzeros.data) + 1  # v1 checkpoints store z - 1
            q = self._sort_groups(q, self.g_idx.data)
            del self.g_idx
        self.qweight = nn.Parameter(pack_rows(q), requires_grad=False)
        self.zeros = nn.Parameter(zeros.to(torch.uint8), requires_grad=False)
        del self.qzeros
        self.scales = nn.Parameter(self.scales.data.contiguous(), requires_grad=False)

    def _sort_groups(self, q: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
        K = q.shape[0]
        contiguous = torch.arange(K, device=g_idx.device, dtype=torch.int32) // self.group_size
        if torch.equal(g_idx, contiguous):
            return q
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], contiguous):
            raise ValueError("gptq: g_idx does not put exactly group_size inputs in each group")
        self.perm = perm
        return q[perm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        if rows.is_cuda:
            y = w4a16_gemm(rows.contiguous(), self.qweight, self.scales, self.zeros, self.group_size)
        else:  # CPU: dequantize this layer on the fly
            y = w4a16_gemm_ref(rows, self.qweight, self.scales, self.zeros, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

