"""Quantized layers on the GPU against their reference arithmetic: the fp8 layer through
torch._scaled_mm, the AWQ layer through the W4A16 Triton kernel (Llama-3-8B-sized layers)."""
import pytest
import torch

from engine.quant.config import QuantConfig
from engine.quant.fp8 import Fp8Linear, fp8_gemm_ref, quantize_per_token
from engine.quant.int4 import Int4Linear
from engine.quant.packers import awq_tensors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_capable(), reason="needs an FP8 GPU (sm89+)")
@pytest.mark.parametrize("M", [1, 5, 64, 300])
def test_fp8_scaled_mm_matches_reference(M):
    torch.manual_seed(M)
    linear = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear.from_dense(linear)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_per_token(x)
    want = fp8_gemm_ref(xq, xs, layer.weight, layer.weight_scale, None, torch.float32)
    got = layer(x).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("M", [1, 16, 200])
def test_awq_layer_kernel_matches_cpu_reference(M):
    torch.manual_seed(0)
    w = torch.randn(2048, 4096) * 0.02
    tensors, _ = awq_tensors({"model.layers.0.mlp.down_proj.weight": w}, 128, reference=False)
    layers = {}
    for device in ("cpu", "cuda"):
        layer = Int4Linear(4096, 2048, QuantConfig("awq", "awq", group_size=128), torch.float16, device)
        for suffix in ("qweight", "qzeros", "scales"):
            getattr(layer, suffix).weight_loader(tensors[f"model.layers.0.mlp.down_proj.{suffix}"].to(device), 0, None)
        layer.finalize()
        layers[device] = layer
    x = torch.randn(M, 4096, dtype=torch.float16)
    want = x.float() @ _dense(layers["cpu"]).t()
    got = layers["cuda"](x.cuda()).float().cpu()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def _dense(layer: Int4Linear) -> torch.Tensor:
    from kernels.w4a16_gemm import dequantize

    return dequantize(layer.qweight, layer.scales, layer.zeros, layer.group_size, torch.float32).t()
