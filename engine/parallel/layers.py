"""Linear layers of a (possibly) tensor-parallel model. With `tp` None (one rank) each is the
plain layer: no collective, no extra copy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel.group import TPGroup
from kernels.skinny_gemm import MAX_M, skinny_gemm

_SKINNY_DTYPES = (torch.bfloat16, torch.float16)  # its tuned tiles do not fit shared memory in fp32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except decode-sized batches on CUDA (<= 16 rows) go to our skinny GEMM, which
    streams the weights closer to the bandwidth ceiling than cuBLAS does at these shapes (H100,
    Llama-3-8B: 5.10 vs 5.64 ms of GEMMs per batch-1 step; bench/skinny_gemm_bench.py)."""
    if (x.is_cuda and x.dtype in _SKINNY_DTYPES and x.dtype == weight.dtype and x.dim() == 2
            and 0 < x.shape[0] <= MAX_M and x.stride(1) == 1):
        y = skinny_gemm(x, weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """Also the column-parallel layer: a rank's shard is a Linear with fewer output features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(Linear):
    """Holds this rank's input columns; the partial outputs are summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup | None):
        super().__init__(in_features, out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.tp is None else self.tp.all_reduce(y)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding; a token outside them embeds to zeros here and
    the all-reduce adds the rank that holds it."""

    def __init__(self, rows: int, dim: int, start: int, tp: TPGroup | None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))  # padding rows stay zero
        self.start = start
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(x)


def gather_vocab(logits: torch.Tensor, vocab_size: int, tp: TPGroup | None) -> torch.Tensor:
    """[T, vocab_per_rank] on every rank -> the full [T, vocab_size] logits on every rank."""
    if tp is None:
        return logits
    return torch.cat(tp.all_gather(logits), dim=-1)[:, :vocab_size]
