"""GGUF weights kept packed: Q8_0, Q4_0, Q4_1, Q4_K and Q6_K tensors stay in (about) their file
size in memory and are dequantized one layer at a time as the layer runs.

Block layouts (llama.cpp's ggml-quants; one row = cols / block elements blocks, little endian):
  Q8_0  32 el, 34 B: d f16, q int8[32];                         w = d * q
  Q4_0  32 el, 18 B: d f16, qs u8[16] (el j low nibble, j+16 high); w = d * (q - 8)
  Q4_1  32 el, 20 B: d f16, m f16, qs u8[16] (as Q4_0);         w = d * q + m
  Q4_K 256 el, 144 B: d f16, dmin f16, scales u8[12] (8 six-bit scales and mins), qs u8[128]
        (each 64 elements: 32 low nibbles then 32 high nibbles);   w = d * sc * q - dmin * mn
  Q6_K 256 el, 210 B: ql u8[128] (low 4 bits), qh u8[64] (high 2 bits), scales i8[16], d f16;
        w = d * scale * (q - 32), one scale per 16 elements
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant.params import loaded_param

# type name -> (elements per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q6_K": (256, 210)}


@dataclass(frozen=True)
class PackedTensor:
    """A gguf tensor as stored: `data` uint8 [rows, row bytes] of `qtype` blocks, `cols` per row."""

    qtype: str
    data: torch.Tensor
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian halves -> fp32 [...]."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def dequantize(p: PackedTensor) -> torch.Tensor:
    """fp32 [rows, cols]."""
    per_block, nbytes = BLOCKS[p.qtype]
    rows = p.data.shape[0]
    blocks = p.data.reshape(rows, -1, nbytes)  # [rows, nb, bytes]
    return _DEQUANT[p.qtype](blocks).reshape(rows, p.cols)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """u8 [..., n] -> [..., 2n]: the n low nibbles, then the n high ones."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _q8_0(b):
    return _f16(b[..., 0:2])[..., None] * b[..., 2:].view(torch.int8).float()


def _q4_0(b):
    return _f16(b[..., 0:2])[..., None] * (_nibbles(b[..., 2:]).float() - 8)


def _q4_1(b):
    return _f16(b[..., 0:2])[..., None] * _nibbles(b[..., 4:]).float() + _f16(b[..., 2:4])[..., None]


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> 8 scales and 8 mins (6 bits each)."""
    s = s.to(torch.int32)
    lo_sc, lo_mn = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_mn = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat((lo_sc, hi_sc), -1).float(), torch.cat((lo_mn, hi_mn), -1).float()


def _q4_k(b):
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scales(b[..., 4:16])  # [..., 8]
    qs = b[..., 16:].reshape(*b.shape[:-1], 4, 32)  # 4 chunks of 64 elements
    q = _nibbles(qs).reshape(*b.shape[:-1], 8, 32).float()  # sub-block 2c = low, 2c + 1 = high nibbles
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).flatten(-2)


def _q6_k(b):
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 64).to(torch.int32)  # two halves of 128 elements
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 32).to(torch.int32)
    scales = b[..., 192:208].view(torch.int8).float().reshape(*b.shape[:-1], 2, 8)
    d = _f16(b[..., 208:210])[..., None, None]
    low = torch.cat((ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4), -1)  # [.., 2, 128]
    high = torch.cat([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], -1)
    q = (low | (high << 4)).float() - 32  # [..., 2, 128]
    scale = scales.repeat_interleave(16, dim=-1)  # one per 16 elements
    return (d * scale * q).flatten(-2)


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}


# How a packed part is multiplied on CPU (bench: python -m engine.quant.gguf, docs/PERFORMANCE.md):
# torch's weight-only int4 / int8 kernels with bf16 activations beat dequantizing each layer in
# every step by ~2-3 orders of magnitude on 2 cores. Q4_0 / Q4_1 / Q4_K map exactly onto the int4
# kernel's groups of 32 ((q - 8) * scale + zero, scale and zero rounded to bf16); Q8_0 / Q6_K are
# requantized to int8 with one scale per row (about 0.2% of a row's max of added error).
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0", "Q6_K")


def int4_groups(p: PackedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q int32 [rows, cols] in 0..15, scale and zero fp32 [rows, cols / 32] with
    w = (q - 8) * scale + zero exactly, for Q4_0 / Q4_1 / Q4_K."""
    rows = p.data.shape[0]
    _, nbytes = BLOCKS[p.qtype]
    b = p.data.reshape(rows, -1, nbytes)
    if p.qtype == "Q4_K":
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k_scales(b[..., 4:16])
        q = _nibbles(b[..., 16:].reshape(rows, -1, 4, 32))  # [rows, nb, 4, 64]: sub-blocks 2c, 2c + 1
        scale, offset = (d * sc).reshape(rows, -1), -(dmin * mn).reshape(rows, -1)
    else:
        d = _f16(b[..., 0:2])
        start = 4 if p.qtype == "Q4_1" else 2
        q = _nibbles(b[..., start:])
        scale = d
        offset = _f16(b[..., 2:4]) if p.qtype == "Q4_1" else -8 * d
    return q.reshape(rows, p.cols).to(torch.int32), scale, offset + 8 * scale


class _Int4Part(nn.Module):
    def __init__(self, p: PackedTensor):
        super().__init__()
        q, scale, zero = int4_groups(p)
        self.weight = nn.Parameter(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), requires_grad=False)
        self.scales_zeros = nn.Parameter(torch.stack((scale.t(), zero.t()), -1).to(torch.bfloat16).contiguous(),
                                         requires_grad=False)  # [groups, rows, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, 32, self.scales_zeros)


class _Int8Part(nn.Module):
    def __init__(self, p: PackedTensor):
        super().__init__()
        w = dequantize(p)
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        self.weight = nn.Parameter(torch.round(w / scale[:, None]).to(torch.int8), requires_grad=False)
        self.scales = nn.Parameter(scale.to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scales[ids].float()[:, None]


class _DequantPart(nn.Module):
    """Dequantized to x's dtype at every call (exact; CUDA, F32 parts, and the reference)."""

    def __init__(self, p: PackedTensor):
        super().__init__()
        self.qtype, self.cols = p.qtype, p.cols
        self.data = nn.Parameter(p.data.contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(self.data).to(x.dtype))

    def dense(self, data: torch.Tensor) -> torch.Tensor:
        return data.float() if self.qtype == "F32" else dequantize(PackedTensor(self.qtype, data, self.cols))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense(self.data[ids])


def make_part(p: PackedTensor, backend: str) -> nn.Module:
    if backend == "torch-int" and p.qtype in INT4_TYPES and p.cols % 32 == 0:
        return _Int4Part(p)
    if backend == "torch-int" and p.qtype in INT8_TYPES:
        return _Int8Part(p)
    return _DequantPart(p)


class GGUFLinear(nn.Module):
    """y = x @ W^T with W's parts (q/k/v, gate/up, or one tensor) kept in (about) their gguf size.
    backend "torch-int": torch's weight-only int kernels, activations in bf16 (CPU); "dequant":
    each part dequantized to x's dtype as the layer runs (exact)."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None = None,
                 backend: str = "torch-int"):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight = loaded_param(torch.empty(0, dtype=torch.uint8), self._load_part)  # placeholder until finalize
        self._pending: dict[int, PackedTensor] = {}
        self.bias = bias
        self.parts = nn.ModuleList()

    def _load_part(self, packed: PackedTensor, offset: int, size: int | None) -> None:
        if not isinstance(packed, PackedTensor):  # an F32 / F16 tensor in a quantized file
            packed = PackedTensor("F32", packed.float(), packed.shape[1])
        rows = self.out_features if size is None else size
        if packed.shape != (rows, self.in_features):
            raise ValueError(f"gguf: tensor of shape {packed.shape} for a {rows} x {self.in_features} part")
        self._pending[offset] = packed

    def finalize(self) -> None:
        """Parts in output order, neighbours of one type joined (one kernel call each)."""
        joined: list[PackedTensor] = []
        for offset in sorted(self._pending):
            p = self._pending[offset]
            if joined and joined[-1].qtype == p.qtype:
                p = PackedTensor(p.qtype, torch.cat((joined.pop().data, p.data)), p.cols)
            joined.append(p)
        self._pending.clear()
        for p in joined:
            self.parts.append(make_part(p, self.backend))
        del self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        compute = rows.to(torch.bfloat16) if self.backend == "torch-int" else rows
        ys = [part(compute) for part in self.parts]
        y = (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)).to(x.dtype)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class GGUFEmbedding(GGUFLinear):
    """Token embedding kept packed: only the looked-up rows are dequantized. With tied
    embeddings it is also the LM head (`logits`)."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, backend: str = "torch-int"):
        super().__init__(dim, num_embeddings, backend=backend)
        self.dtype = dtype

    def finalize(self) -> None:
        if len(self._pending) != 1:
            raise ValueError("gguf: a token embedding split into parts is not supported")
        packed = next(iter(self._pending.values()))
        super().finalize()
        head = self.parts[0]
        # An int4 head cannot give rows back: lookups then read a packed copy (the embedding twice).
        self.lookup = head if hasattr(head, "rows") else _DequantPart(packed)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dense = self.lookup.rows(input_ids.reshape(-1))
        return dense.to(self.dtype).reshape(*input_ids.shape, self.in_features)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden)
