"""Model registry: HF `model_type` -> (module, class), imported lazily.

Adding a model = one file + one line here.
"""
from __future__ import annotations

import importlib

_REGISTRY: dict[str, tuple[str, str]] = {
    "llama": ("engine.models.llama", "LlamaForCausalLM"),
    "mistral": ("engine.models.llama", "LlamaForCausalLM"),
    "qwen2": ("engine.models.llama", "LlamaForCausalLM"),
}


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(model_type: str):
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported: {', '.join(supported_model_types())}")
    module, cls = _REGISTRY[model_type]
    return getattr(importlib.import_module(module), cls)
