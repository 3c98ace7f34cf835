"""Quantized checkpoints end to end on CPU: tiny random models quantized by our packers into the
AWQ, GPTQ (desc_act false / true, sym / asym) and fp8 (compressed-tensors, fbgemm_fp8) layouts,
loaded through `--quantization` detection, generate greedily the same tokens as HF's model with
the weights each checkpoint encodes (AWQ / GPTQ) or with fp8 W8A8 arithmetic (fp8)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import LLM
from engine.loader import load_model_source
from engine.quant import checkpoint_quant_config, resolve_quant_config
from engine.quant.fp8 import Fp8Linear, quantize_per_channel, quantize_per_token
from engine.quant.int4 import Int4Linear
from engine.quant.packers import write_checkpoint
from tests.engine.helpers import greedy, hf_greedy, hf_model, random_prompts, token_ids

PROMPTS = random_prompts(2, 49152, lo=3, hi=40, seed=7)
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def dense_dir(make_tiny_model):
    return make_tiny_model("llama")


def _quantized(dense_dir, tmp_path_factory, method, **kw):
    dst = tmp_path_factory.mktemp(f"q-{method}")
    ref = write_checkpoint(dense_dir, dst, method, **kw)
    return dst, ref


def _hf_with(dense_dir, weights: dict[str, torch.Tensor]):
    model = hf_model(dense_dir)
    state = model.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(w)
    return model


def _engine_tokens(path, **kw):
    llm = LLM(str(path), num_gpu_blocks=256, enable_prefix_caching=False, **kw)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, (Int4Linear, Fp8Linear))]
    return token_ids(llm.generate(PROMPTS, greedy(MAX_TOKENS))), layers


INT4_CASES = {
    "awq-g32": ("awq", dict(group_size=32)),
    "gptq-g32-sym": ("gptq", dict(group_size=32, desc_act=False, sym=True)),
    "gptq-g16-asym-act-order": ("gptq", dict(group_size=16, desc_act=True, sym=False)),
    "gptq-whole-row-act-order": ("gptq", dict(group_size=-1, desc_act=True, sym=True)),
}


@pytest.mark.parametrize("case", list(INT4_CASES))
def test_int4_checkpoint_matches_hf_on_its_dequantized_weights(dense_dir, tmp_path_factory, case):
    method, kw = INT4_CASES[case]
    path, ref = _quantized(dense_dir, tmp_path_factory, method, **kw)
    source = load_model_source(str(path))
    quant = resolve_quant_config(None, source)
    assert quant.method == method and quant.pre_quantized
    got, layers = _engine_tokens(path)
    assert len(layers) == 4 * 2  # qkv, o, gate_up, down per layer
    if kw.get("desc_act") and kw["group_size"] != -1:  # one group per row needs no reordering
        assert all(layer.perm is not None for layer in layers)
    want = hf_greedy(_hf_with(dense_dir, ref), PROMPTS, MAX_TOKENS)
    assert got == want


def _fp8_reference(model: nn.Module) -> nn.Module:
    """HF's model with every decoder linear computing W8A8 fp8 through torch._scaled_mm (CPU)."""

    class ScaledMM(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.wq, self.ws = quantize_per_channel(linear.weight.data)

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1])
            xq, xs = quantize_per_token(rows)
            y = torch._scaled_mm(xq, self.wq.t(), scale_a=xs, scale_b=self.ws.t(), out_dtype=torch.float32)
            return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, ScaledMM(child))
    return model


@pytest.fixture(scope="module")
def fp8_at_load(dense_dir):
    return _engine_tokens(dense_dir, quantization="fp8")


def test_fp8_quantized_at_load_matches_hf_with_scaled_mm(dense_dir, fp8_at_load):
    got, layers = fp8_at_load
    assert len(layers) == 8 and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    assert got == hf_greedy(_fp8_reference(hf_model(dense_dir)), PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("layout", ["compressed-tensors", "fbgemm_fp8"])
def test_fp8_checkpoint_equals_quantized_at_load(dense_dir, tmp_path_factory, fp8_at_load, layout):
    path, _ = _quantized(dense_dir, tmp_path_factory, layout, strategy="channel")
    quant = checkpoint_quant_config(load_model_source(str(path)).config)
    assert (quant.method, quant.layout) == ("fp8", layout)
    got, layers = _engine_tokens(path)
    assert len(layers) == 8
    assert got == fp8_at_load[0]


def test_fp8_per_tensor_scales_become_per_channel(dense_dir, tmp_path_factory):
    path, ref = _quantized(dense_dir, tmp_path_factory, "compressed-tensors", strategy="tensor")
    llm = LLM(str(path), num_gpu_blocks=64)
    attn = llm.engine.runner.model.layers[0].self_attn
    qkv = attn.qkv_proj
    dequant = qkv.weight.float() * qkv.weight_scale
    want = torch.cat([ref[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    torch.testing.assert_close(dequant, want, rtol=0, atol=0)
    q_rows = qkv.weight_scale[:attn.q_size]
    assert torch.all(q_rows == q_rows[0])  # one scale for all of q's rows, another for k's
    assert llm.generate(PROMPTS[:1], greedy(4))[0].outputs[0].token_ids


def test_fp8_static_input_scale_takes_the_largest_part(dense_dir, tmp_path_factory):
    path, _ = _quantized(dense_dir, tmp_path_factory, "compressed-tensors", strategy="channel", input_scale=0.02)
    llm = LLM(str(path), num_gpu_blocks=64)
    qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert qkv.input_scale.item() == pytest.approx(0.02)
    x = torch.randn(3, qkv.in_features)
    xq = (x / 0.02).clamp(-448, 448).to(torch.float8_e4m3fn)
    want = (xq.float() * 0.02) @ (qkv.weight.float() * qkv.weight_scale).t()
    torch.testing.assert_close(qkv(x), want, rtol=1e-5, atol=1e-5)


def test_mismatched_or_unsupported_quantization_is_refused(dense_dir, tmp_path_factory):
    path, _ = _quantized(dense_dir, tmp_path_factory, "awq", group_size=32)
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        LLM(str(path), quantization="gptq", num_gpu_blocks=64)
    with pytest.raises(ValueError, match="needs a checkpoint quantized with awq"):
        LLM(str(dense_dir), quantization="awq", num_gpu_blocks=64)
    with pytest.raises(ValueError, match="needs a .gguf"):
        LLM(str(dense_dir), quantization="gguf", num_gpu_blocks=64)
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(str(dense_dir), quantization="int3", num_gpu_blocks=64)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        LLM(str(dense_dir), kv_cache_dtype="int8", num_gpu_blocks=64)  # fp8: tests/engine/test_fp8_kv.py


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "only the 'gemm' packing"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "only 4-bit"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}, "checkpoint_format"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
    ({"quant_method": "bitsandbytes"}, "unsupported checkpoint quantization"),
])
def test_unsupported_quantization_configs_name_the_problem(qc, match):
    class Config:
        quantization_config = qc

    with pytest.raises(ValueError, match=match):
        checkpoint_quant_config(Config())


def test_quantization_flags_reach_engine_args_and_env_twins():
    import argparse

    from engine.cli_args import add_engine_args, engine_args_from

    ns = add_engine_args(argparse.ArgumentParser()).parse_args(["--quantization", "awq"])
    args = engine_args_from(ns, role="decode")
    assert (args.quantization, args.kv_cache_dtype) == ("awq", "auto")
    env = {"PDSERVE_QUANTIZATION": "fp8"}
    assert engine_args_from(add_engine_args(argparse.ArgumentParser(), env=env).parse_args([]), "both").quantization == "fp8"
    with pytest.raises(SystemExit):
        add_engine_args(argparse.ArgumentParser()).parse_args(["--quantization", "int3"])
