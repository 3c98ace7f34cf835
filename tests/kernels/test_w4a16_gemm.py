"""W4A16 GEMM against the dequantize-then-matmul reference.

On CPU the kernel runs under Triton's interpreter (conftest.py) at small odd shapes in fp16 and
fp32 (the interpreter's bf16 `tl.dot` is not faithful): decode and prefill tiles, split-K,
groups that a K tile straddles or not, a whole-row group, M not a multiple of BLOCK_M and N not
a multiple of BLOCK_N. The GPU test runs Llama-3-8B shapes in bf16 / fp16.
"""
import pytest
import torch

from kernels.w4a16_gemm import W4A16Config, dequantize, pick_config, w4a16_gemm, w4a16_gemm_ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _inputs(M, N, K, group, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    groups = -(-K // group)
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, N, generator=g) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (groups, N), dtype=torch.uint8, generator=g)
    x = torch.randn(M, K, generator=g).to(dtype)
    return [t.to(device) for t in (x, qweight, scales, zeros)]


def _check(y, x, qweight, scales, zeros, group):
    assert not torch.isnan(y).any()
    ref = w4a16_gemm_ref(x.double(), qweight, scales.double(), zeros, group)  # exact weights, fp64 sum
    torch_err = (w4a16_gemm_ref(x, qweight, scales, zeros, group).double() - ref).abs().max().item()
    err = (y.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    # Within a few times plain torch's own error in this dtype (and never above 1% of the output range).
    assert err <= max(4 * torch_err, 1e-5 * scale) and err <= 1e-2 * scale, (err, torch_err, scale)


CASES = [  # M, N, K, group, config (None = pick_config)
    (1, 40, 96, 32, None),  # decode tiles, N and K below one tile
    (3, 72, 256, 64, W4A16Config(16, 32, 64, split_k=3)),  # split-K, groups aligned to the K tiles
    (5, 24, 96, 16, W4A16Config(16, 16, 32, split_k=2)),  # K tiles straddle groups of 16
    (2, 16, 96, 96, W4A16Config(16, 16, 32)),  # one group for the whole row (GPTQ group_size -1)
    (37, 56, 128, 32, W4A16Config(32, 32, 32)),  # prefill-like: M over one tile, N not a multiple
    (70, 24, 64, 32, None),  # prefill tiles from pick_config
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, N, K, group, config", CASES)
def test_w4a16_matches_dequantized_matmul(M, N, K, group, config, dtype):
    x, qweight, scales, zeros = _inputs(M, N, K, group, dtype, seed=M * 7 + N)
    y = w4a16_gemm(x, qweight, scales, zeros, group, config)
    assert y.shape == (M, N) and y.dtype == dtype
    _check(y, x, qweight, scales, zeros, group)


def test_dequantize_reads_each_nibble_in_order():
    qweight = torch.tensor([[0x76543210, -0x789ABCDF]], dtype=torch.int32)  # 0x87654321 as int32
    scales = torch.ones(1, 2)
    zeros = torch.zeros(1, 2, dtype=torch.uint8)
    w = dequantize(qweight, scales, zeros, 8)
    assert w[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert w[:, 1].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_pick_config_decode_vs_prefill_tiles():
    decode, prefill = pick_config(1, 4096, 4096), pick_config(512, 4096, 4096)
    assert decode.block_m == 16 and decode.split_k > 1  # 64 N tiles cannot fill 132 SMs alone
    assert prefill.block_m == 64 and prefill.split_k == 1
    assert pick_config(1, 28672, 4096).split_k == 1  # 448 N tiles already do


def test_launcher_refuses_bad_layouts():
    x, qweight, scales, zeros = _inputs(2, 16, 64, 32, torch.float32, seed=1)
    with pytest.raises(AssertionError):
        w4a16_gemm(x, qweight[:4], scales, zeros, 32)  # K // 8 rows expected
    with pytest.raises(AssertionError):
        w4a16_gemm(x, qweight, scales.half(), zeros, 32)  # scales in x's dtype
    with pytest.raises(AssertionError):
        w4a16_gemm(x, qweight, scales, zeros.int(), 32)  # zeros are uint8


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 7, 16, 300])
@pytest.mark.parametrize("N, K", [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_w4a16_gpu_llama3_shapes(M, N, K, dtype):
    x, qweight, scales, zeros = _inputs(M, N, K, 128, dtype, seed=M)
    _check(w4a16_gemm(x, qweight, scales, zeros, 128), x, qweight, scales, zeros, 128)
