"""Parameters that place checkpoint tensors themselves: the model's `load_weights` calls
`param.weight_loader(tensor, offset, size)` (offset / size: the output rows of one fused part,
size None for an unfused layer) instead of copying into the parameter."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Loader = Callable[[torch.Tensor, int, "int | None"], None]


def loaded_param(t: torch.Tensor, loader: Loader) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    p.weight_loader = loader
    return p


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} != layer {tuple(dst.shape)}")
    dst.copy_(src)
