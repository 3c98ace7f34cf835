"""Attention backends: a torch reference (CPU and GPU) and a Triton backend (CUDA)."""
from __future__ import annotations

from engine.attention.base import AttentionBackend, AttentionMetadata

_BACKENDS = {
    "torch": ("engine.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("engine.attention.triton_backend", "TritonAttentionBackend"),
}


def get_backend_class(name: str):
    """Returns the backend class registered under `name` (imported lazily)."""
    import importlib

    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def default_backend_name(device_type: str) -> str:
    return "triton" if device_type == "cuda" else "torch"


__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend_class", "default_backend_name"]
