"""A .gguf checkpoint stays packed by default where the packed CPU kernels pay (CPU, bf16, one
rank): the default model then takes about its file's size in memory. `--quantization none`
dequantizes it; fp32, CUDA and tensor parallelism stay dense."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from engine.quant.config import gguf_packed_by_default, resolve
from engine.quant.gguf import GGUFLinear


def test_what_unset_means_for_a_gguf_checkpoint():
    cfg = LlamaConfig()
    assert resolve(None, cfg, is_gguf=True, gguf_packed=True).method == "gguf"
    assert resolve(None, cfg, is_gguf=True, gguf_packed=False) is None
    assert resolve(None, cfg, is_gguf=False, gguf_packed=True) is None  # only a .gguf is kept packed
    assert resolve("none", cfg, is_gguf=True, gguf_packed=True) is None
    assert resolve("gguf", cfg, is_gguf=True, gguf_packed=False).method == "gguf"


def test_none_refuses_a_prequantized_checkpoint():
    cfg = LlamaConfig(quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128,
                                           "version": "gemm", "zero_point": True})
    with pytest.raises(ValueError, match="--quantization none: the checkpoint is quantized \\(awq"):
        resolve("none", cfg)


@pytest.mark.parametrize("device, dtype, tp, packed", [
    ("cpu", torch.bfloat16, 1, True), ("cpu", torch.float32, 1, False), ("cpu", torch.bfloat16, 3, False),
    ("cuda", torch.bfloat16, 1, False), ("cuda", torch.float16, 1, False)])
def test_packed_by_default_only_on_one_cpu_rank_in_bf16(device, dtype, tp, packed):
    assert gguf_packed_by_default(device, dtype, tp) is packed


def _packed_layers(llm) -> int:
    return sum(isinstance(m, GGUFLinear) for m in llm.engine.runner.model.modules())


def _dense_matrices(llm) -> list[str]:
    """Decoder-layer modules holding a dense floating-point weight matrix."""
    return [n for n, m in llm.engine.runner.model.named_modules()
            if "layers." in n and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and m.weight.is_floating_point()]


@pytest.mark.slow  # three loads of the default model (~5 s each)
def test_the_default_model_is_packed_in_bf16_and_dense_otherwise(default_model_path):
    from engine import LLM, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    packed = LLM(str(default_model_path), dtype="bfloat16", num_gpu_blocks=64, max_num_seqs=4)
    model = packed.engine.runner.model
    assert _packed_layers(packed) >= 30 * 4  # qkv, o, gate_up and down of each of the 30 decoder layers
    assert _dense_matrices(packed) == []
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes < default_model_path.stat().st_size  # about the file's size, not 4x it
    assert len(packed.generate([{"prompt_token_ids": [1, 2, 3]}], greedy)[0].outputs[0].token_ids) == 4
    del packed, model
    for kwargs in ({"dtype": "bfloat16", "quantization": "none"}, {"dtype": "float32"}):
        dense = LLM(str(default_model_path), num_gpu_blocks=64, max_num_seqs=4, **kwargs)
        assert _packed_layers(dense) == 0 and len(_dense_matrices(dense)) >= 30 * 4, kwargs
        del dense
