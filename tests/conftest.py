"""Shared fixtures: the default model file and tiny random-weight HF models.

``make_tiny_model(arch, **overrides) -> Path`` builds (once per session and argument set) a
tiny model directory: config.json, model.safetensors (or shards), generation_config.json and
the default model's real tokenizer (vocab 49152, ChatML chat template; eos 2 = <|im_end|>).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest
import torch
import transformers

# `--dtype auto` on CPU picks bf16 where the processor has native bf16 (engine/config.py); the suite's
# tests (parity with HF in fp32, batched == alone) were written for fp32, so they keep it on every
# machine. Subprocesses (nodes, `pdserve serve`) inherit it. tests/engine/test_dtype_auto.py covers auto.
os.environ.setdefault("PDSERVE_CPU_AUTO_DTYPE", "float32")

_COMMON = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, max_position_embeddings=512,
    initializer_range=0.1, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
TINY_ARCHS = {
    "llama": (transformers.LlamaConfig, dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "llama3": (transformers.LlamaConfig, dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "mistral": (transformers.MistralConfig, dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "smollm2": (transformers.LlamaConfig, dict(  # tied embeddings, no GQA
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        tie_word_embeddings=True)),
}


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    config_cls, kwargs = TINY_ARCHS[arch]
    return config_cls(**{**_COMMON, **kwargs, **overrides})


def build_tiny_model(arch: str, **overrides) -> transformers.PreTrainedModel:
    """The tiny model itself (seeded, so equal arguments give equal weights)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides),
                                                          dtype=torch.float32)
    if arch == "qwen2":  # HF initialises the qkv biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def default_model_path() -> pathlib.Path:
    from engine.default_model import default_model_path as path

    return path()


@pytest.fixture(scope="session")
def default_tokenizer(default_model_path):
    from engine.loader import load_model_source

    return load_model_source(str(default_model_path)).tokenizer


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory, default_tokenizer):
    """make_tiny_model(arch, *, dtype=torch.float32, max_shard_size=None,
    generation_config=None, **config_overrides) -> model directory.

    arch: llama | llama3 | mistral | qwen2 | smollm2. generation_config defaults to
    {"eos_token_id": 2}; pass a dict to write another one (e.g. a list of eos ids)."""
    built: dict[str, pathlib.Path] = {}

    def make(arch: str, *, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
             generation_config: dict | None = None, **overrides) -> pathlib.Path:
        generation_config = {"eos_token_id": 2} if generation_config is None else generation_config
        key = json.dumps([arch, str(dtype), max_shard_size, generation_config, overrides],
                         sort_keys=True, default=str)
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")
            model = build_tiny_model(arch, **overrides).to(dtype)
            model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
            (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
            default_tokenizer.save_pretrained(path)
            built[key] = path
        return built[key]

    return make
