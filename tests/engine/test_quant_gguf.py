"""GGUF kept packed: our torch dequantizers against gguf-py's (llama.cpp's reference in numpy)
on random blocks of every supported type, and a packed layer against its dense twin."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine.quant.gguf import BLOCKS, GGUFEmbedding, GGUFLinear, PackedTensor, dequantize

_HALF_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}  # f16 byte offsets


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """uint8 [rows, row bytes] of random blocks whose f16 scales are finite and modest."""
    per_block, nbytes = BLOCKS[qtype]
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (rows, cols // per_block, nbytes), dtype=torch.uint8, generator=g)
    for off in _HALF_FIELDS[qtype]:
        half = (torch.rand(rows, cols // per_block, generator=g) * 0.02 + 0.001).half()
        data[..., off:off + 2] = half.view(torch.uint8).reshape(rows, cols // per_block, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(BLOCKS))
def test_dequantize_matches_gguf_py(qtype):
    rows, cols = 5, 512
    data = random_blocks(qtype, rows, cols, seed=len(qtype))
    want = gguf_dequantize(data.numpy(), GGMLQuantizationType[qtype]).astype(np.float32)
    got = dequantize(PackedTensor(qtype, data, cols))
    assert got.shape == (rows, cols)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-6, atol=1e-7)


def _parts():
    return [PackedTensor("Q4_K", random_blocks("Q4_K", 8, 256, 1), 256),
            PackedTensor("Q4_K", random_blocks("Q4_K", 8, 256, 2), 256),
            PackedTensor("Q6_K", random_blocks("Q6_K", 8, 256, 3), 256)]


def _loaded(layer, parts):
    for i, p in reversed(list(enumerate(parts))):  # arrival order does not matter
        layer.weight.weight_loader(p, 8 * i, 8)
    layer.finalize()
    return layer


def test_dequant_backend_joins_parts_of_one_type_and_is_exact():
    parts = _parts()
    layer = _loaded(GGUFLinear(256, 24, backend="dequant"), parts)
    assert [p.qtype for p in layer.parts] == ["Q4_K", "Q6_K"] and layer.parts[0].data.shape == (16, 144)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ torch.cat([dequantize(p) for p in parts]).t())
    assert sum(p.numel() for p in layer.parameters()) == 16 * 144 + 8 * 210  # the file's bytes, nothing dense


def test_torch_int_backend_is_close_and_small():
    parts = _parts()
    layer = _loaded(GGUFLinear(256, 24, backend="torch-int"), parts)
    x = torch.randn(3, 256)
    want = x @ torch.cat([dequantize(p) for p in parts]).t()
    got = layer(x)
    assert got.dtype == torch.float32
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel  # bf16 activations and scales, int8 rows for Q6_K
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert weight_bytes < 24 * 256 * 1.2  # ~1 byte a weight or less (fp32 would be 4)


@pytest.mark.parametrize("backend", ["dequant", "torch-int"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_packed_embedding_looks_up_rows_and_is_the_tied_head(backend, qtype):
    emb = GGUFEmbedding(64, 32, torch.float32, backend=backend)
    data = random_blocks(qtype, 64, 32, 4)
    emb.weight.weight_loader(PackedTensor(qtype, data, 32), 0, None)
    emb.finalize()
    dense = dequantize(PackedTensor(qtype, data, 32))
    ids = torch.tensor([[3, 63], [0, 3]])
    tol = dict(rtol=0, atol=0) if backend == "dequant" or qtype == "Q4_0" else dict(rtol=0, atol=dense.abs().max().item() / 200)
    torch.testing.assert_close(emb(ids), dense[ids], **tol)
    h = torch.randn(2, 32)
    want = h @ dense.t()
    torch.testing.assert_close(emb.logits(h), want, rtol=0, atol=(1e-5 if backend == "dequant" else 3e-2) * want.abs().max().item())
