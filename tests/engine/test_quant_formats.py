"""Bit layouts of the packed formats (written out nibble by nibble from each format's rule) and
the fp8 layer's arithmetic against torch._scaled_mm on CPU."""
import pytest
import torch

from engine.quant.fp8 import FP8, Fp8Linear, check_fp8_device, quantize_per_channel, quantize_per_token
from engine.quant.int4 import AWQ_ORDER, AWQ_REVERSE, pack_cols, pack_rows, unpack_cols
from engine.quant.packers import gptq_tensors
from kernels.w4a16_gemm import unpack_rows


def _nibble(word: int, i: int) -> int:
    return (word >> (4 * i)) & 0xF


def test_awq_words_hold_columns_in_the_interleaved_order():
    values = torch.randint(0, 16, (3, 16))
    packed = pack_cols(values, AWQ_ORDER)
    assert packed.shape == (3, 2) and packed.dtype == torch.int32
    for r in range(3):
        for c in range(2):
            word = int(packed[r, c]) & 0xFFFFFFFF
            # AutoAWQ: nibble i of a word holds column order_map[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i].
            assert [_nibble(word, i) for i in range(8)] == [int(values[r, 8 * c + j]) for j in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert torch.equal(unpack_cols(packed, AWQ_REVERSE), values)


def test_gptq_qweight_packs_inputs_in_order_and_zeros_minus_one():
    w = torch.randn(16, 32)  # [N, K]
    tensors, ref = gptq_tensors({"model.layers.0.mlp.down_proj.weight": w}, 8, desc_act=False, sym=True)
    qweight = tensors["model.layers.0.mlp.down_proj.qweight"]
    qzeros = tensors["model.layers.0.mlp.down_proj.qzeros"]
    assert qweight.shape == (4, 16) and qzeros.shape == (4, 2)
    assert all(_nibble(int(z) & 0xFFFFFFFF, i) == 7 for z in qzeros.flatten() for i in range(8))  # sym: 8 - 1
    q = unpack_rows(qweight)  # [K, N]
    scales = tensors["model.layers.0.mlp.down_proj.scales"].float()
    for k in (0, 5, 31):
        word = int(qweight[k // 8, 3]) & 0xFFFFFFFF
        assert _nibble(word, k % 8) == q[k, 3]
        torch.testing.assert_close(ref["model.layers.0.mlp.down_proj.weight"][3, k], (q[k, 3] - 8) * scales[k // 8, 3])
    assert torch.equal(unpack_rows(pack_rows(q)), q)


def test_fp8_layer_matches_scaled_mm_and_keeps_shape():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=True)
    layer = Fp8Linear.from_dense(linear)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (40, 1)
    x = torch.randn(2, 5, 48)
    xq, xs = quantize_per_token(x.reshape(-1, 48))
    want = torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=layer.weight_scale.t(),
                            out_dtype=torch.float32) + linear.bias
    torch.testing.assert_close(layer(x), want.reshape(2, 5, 40), rtol=1e-5, atol=1e-5)
    rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert rel < 0.1  # e4m3 weights and activations: a few percent of error, no more


def test_fp8_scales_put_each_row_max_at_448_and_cap_token_scales():
    w = torch.tensor([[1.0, -2.0], [0.0, 0.0]])
    q, scale = quantize_per_channel(w)
    assert q.float()[0].abs().max() == 448 and scale[0, 0] == pytest.approx(2 / 448)
    assert torch.isfinite(scale).all() and q.float()[1].abs().max() == 0
    _, xs = quantize_per_token(torch.tensor([[3000.0, 1.0], [10.0, 1.0]]), scale_ub=1200.0)
    assert xs[:, 0].tolist() == pytest.approx([1200 / 448, 10 / 448])


def test_fp8_refused_on_gpus_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match="compute capability >= 8.9.*A100 is 8.0"):
        check_fp8_device(torch.device("cuda"))
    check_fp8_device(torch.device("cpu"))  # the CPU path needs no fp8 hardware
