"""The fused decoder kernels (RMSNorm, residual add + RMSNorm, SiLU-and-mul, rotary) vs their torch refs.

On CPU they run under Triton's interpreter, whose fp32 -> bf16 cast truncates instead of rounding
to nearest, so bf16 is checked on CUDA only. fp32 must match the reference to ~1e-5 relative;
fp16/bf16 to one ulp, with few elements off at all (rotary and the residual sum: none).
"""
from types import SimpleNamespace

import pytest
import torch

from engine.models.llama import RMSNorm, RotaryEmbedding
from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from kernels.rotary import apply_rotary, apply_rotary_ref
from tests.kernels.paged_case import DEVICE

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
EPS = 1e-5
# Share of elements allowed to differ from the reference in fp16/bf16: where fp32 summation order
# (the norm) or exp's last bit (silu) lands on the other side of a rounding boundary. Such an
# element is one ulp off before the last multiply (by the weight, by `up`), up to 2 ulps after it.
MISMATCH = 0.01
ULPS = 2


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _rows(num_tokens, width, dtype, seed, pad=0):
    """Random rows of varied scale; with pad > 0 a strided view (row stride width + pad)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(num_tokens, 1, generator=g) * 4 + 0.05
    full = (torch.randn(num_tokens, width + pad, generator=g) * scale).to(dtype).to(DEVICE)
    return full[:, pad // 2 : pad // 2 + width] if pad else full


def assert_matches(out, ref, what="", ulps=ULPS):
    """fp32: ~1e-5 relative. fp16/bf16: within `ulps` ulps, and at most MISMATCH of elements off."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (what, out.dtype, ref.dtype, out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
        return
    ulp = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out, ref, rtol=ulps * ulp, atol=1e-5, msg=lambda m: f"{what}: {m}")
    off = (out != ref).float().mean().item()
    assert off <= MISMATCH, f"{what}: {off:.2%} of elements differ from the reference"


# ---------------------------------------------------------------- RMSNorm

NORM_SHAPES = [(1, 4096), (37, 576), (5, 64), (3, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", NORM_SHAPES)
def test_rms_norm(num_tokens, hidden, dtype):
    x = _rows(num_tokens, hidden, dtype, seed=hidden + num_tokens)
    w = _randn(hidden, dtype=dtype, seed=1)
    x_before = x.clone()
    assert_matches(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), f"rms_norm {num_tokens}x{hidden}")
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_rows_and_out(dtype):
    x = _rows(7, 576, dtype, seed=3, pad=64)  # rows of a wider tensor
    assert not x.is_contiguous()
    w = _randn(576, dtype=dtype, seed=4)
    big_out = torch.full((7, 700), float("nan"), dtype=dtype, device=DEVICE)
    out = big_out[:, 10:586]
    assert rms_norm(x, w, 1e-6, out=out) is out
    assert_matches(out, rms_norm_ref(x, w, 1e-6), "rms_norm strided")
    assert big_out[:, :10].isnan().all() and big_out[:, 586:].isnan().all()  # nothing outside `out`


def test_rms_norm_matches_engine_module():
    # The reference is the engine's RMSNorm, run on CPU where it is plain torch (on CUDA it may
    # call this kernel itself), weight included.
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=torch.Generator().manual_seed(5)))
    weight = norm.weight.detach()
    x = _rows(9, 576, torch.float32, seed=6).cpu()
    with torch.no_grad():
        expect = norm(x)
    assert torch.equal(rms_norm_ref(x, weight, 1e-5), expect)
    out = rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-5)
    assert_matches(out, expect.to(DEVICE), "rms_norm vs RMSNorm")


def test_rms_norm_weight_dtype_promotes():
    x = _rows(4, 64, torch.float16, seed=7)
    w = _randn(64, dtype=torch.float32, seed=8)
    out = rms_norm(x, w, EPS)
    assert out.dtype == torch.float32
    assert_matches(out, rms_norm_ref(x, w, EPS), "fp16 x, fp32 weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", NORM_SHAPES)
def test_fused_add_rms_norm(num_tokens, hidden, dtype):
    x = _rows(num_tokens, hidden, dtype, seed=10 + hidden)
    res = _rows(num_tokens, hidden, dtype, seed=11 + hidden)
    w = _randn(hidden, dtype=dtype, seed=12)
    want_norm, want_sum = fused_add_rms_norm_ref(x, res, w, EPS)
    x_ptr, res_ptr = x.data_ptr(), res.data_ptr()
    normed, summed = fused_add_rms_norm(x, res, w, EPS)
    assert normed is x and summed is res and x.data_ptr() == x_ptr and res.data_ptr() == res_ptr
    assert torch.equal(res, want_sum)  # one rounding of the sum, as torch's add: exact
    assert_matches(x, want_norm, f"fused_add_rms_norm {num_tokens}x{hidden}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_strided(dtype):
    x = _rows(6, 576, dtype, seed=20, pad=32)
    res = _rows(6, 576, dtype, seed=21, pad=128)
    w = _randn(576, dtype=dtype, seed=22)
    want_norm, want_sum = fused_add_rms_norm_ref(x, res, w, EPS)
    fused_add_rms_norm(x, res, w, EPS)
    assert torch.equal(res, want_sum)
    assert_matches(x, want_norm, "fused_add_rms_norm strided")


def test_fused_add_rms_norm_is_two_hf_steps():
    # HF's decoder: hidden = residual + hidden; normed = norm(hidden). Same numbers, no allocation.
    dtype = torch.float16
    x, res = _rows(5, 576, dtype, seed=30), _rows(5, 576, dtype, seed=31)
    w = _randn(576, dtype=dtype, seed=32)
    hidden = res + x
    expect = rms_norm_ref(hidden, w, EPS)
    fused_add_rms_norm(x, res, w, EPS)
    assert torch.equal(res, hidden)
    assert_matches(x, expect, "two steps")


def test_norm_zero_rows():
    x = torch.empty(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert rms_norm(x, w, EPS).shape == (0, 64)
    assert fused_add_rms_norm(x, x.clone(), w, EPS)[0].shape == (0, 64)


def test_norm_bad_inputs():
    x = _rows(3, 64, torch.float32, seed=40)
    w = _randn(64, dtype=torch.float32, seed=41)
    with pytest.raises(AssertionError):
        rms_norm(x, w[:32], EPS)  # weight of the wrong size
    with pytest.raises(AssertionError):
        rms_norm(x.t(), w, EPS)  # last dim not contiguous
    with pytest.raises(AssertionError):
        rms_norm(x[0], w, EPS)  # not 2-D
    with pytest.raises(AssertionError):
        rms_norm(x, w, EPS, out=torch.empty(3, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(AssertionError):
        fused_add_rms_norm(x, torch.zeros(2, 64, device=DEVICE), w, EPS)  # residual shape
    with pytest.raises(AssertionError):
        fused_add_rms_norm(x, x.half(), w, EPS)  # residual dtype


# ---------------------------------------------------------------- SiLU and mul

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 1000), (37, 576), (20, 333), (2, 4096)])
def test_silu_and_mul(num_tokens, inter, dtype):
    x = _rows(num_tokens, 2 * inter, dtype, seed=inter)
    assert_matches(silu_and_mul(x), silu_and_mul_ref(x), f"silu_and_mul {num_tokens}x{inter}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_strided_and_out(dtype):
    x = _rows(5, 2 * 300, dtype, seed=50, pad=40)
    big_out = torch.full((5, 320), float("nan"), dtype=dtype, device=DEVICE)
    out = big_out[:, 10:310]
    assert silu_and_mul(x, out) is out
    assert_matches(out, silu_and_mul_ref(x), "silu_and_mul strided")
    assert big_out[:, :10].isnan().all() and big_out[:, 310:].isnan().all()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
def test_silu_and_mul_extremes():
    # Large |gate|: exp overflows to inf for very negative gates; silu must give -0, not NaN.
    x = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0, 1.5, 2.0, 3.0, -1.0, 0.5]], device=DEVICE)
    assert_matches(silu_and_mul(x), silu_and_mul_ref(x), "extremes")


def test_silu_and_mul_bad_inputs():
    with pytest.raises(AssertionError):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))  # odd width
    with pytest.raises(AssertionError):
        silu_and_mul(torch.randn(8, 3, device=DEVICE).t())  # last dim not contiguous
    with pytest.raises(AssertionError):
        silu_and_mul(torch.randn(3, 8, device=DEVICE), torch.empty(3, 8, device=DEVICE))  # out shape
    with pytest.raises(AssertionError):
        silu_and_mul(torch.randn(3, 8, device=DEVICE), torch.empty(3, 4, dtype=torch.float16, device=DEVICE))


# ---------------------------------------------------------------- rotary

def _tables(head_dim, max_pos, theta=500000.0):
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=theta, rope_scaling=None), head_dim, max_pos)
    return rope, rope.cos.to(DEVICE), rope.sin.to(DEVICE)


def _qkv(num_tokens, hq, hk, d, dtype, seed):
    """q, k (and v) as the attention layer gets them: views into one fused qkv output."""
    qkv = _randn(num_tokens, (hq + 2 * hk) * d, dtype=dtype, seed=seed, scale=2.0)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return qkv, q.view(num_tokens, hq, d), k.view(num_tokens, hk, d), v


def _positions(num_tokens, max_pos, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, max_pos, (num_tokens,), generator=g)
    pos[0] = max_pos - 1  # the table's last row
    if num_tokens > 1:
        pos[1] = 0
    return pos.to(DEVICE)


def assert_rotary_matches(out, ref, what):
    # The kernel does the reference's roundings (and no FMA), so every dtype matches bit for bit.
    diff = (out.float() - ref.float()).abs().max().item()
    assert torch.equal(out, ref), f"{what}: max abs diff {diff:.3g}, {(out != ref).float().mean().item():.2%} off"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 37])
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 64), (8, 2, 128), (5, 1, 64), (3, 1, 96)])
def test_rotary_strided_qkv(num_tokens, hq, hk, d, dtype):
    max_pos = 300
    _, cos, sin = _tables(d, max_pos)
    qkv, q, k, v = _qkv(num_tokens, hq, hk, d, dtype, seed=hq * 100 + d)
    if num_tokens > 1:  # (a view with one row normalizes its row stride)
        assert q.stride(0) == k.stride(0) == qkv.stride(0) == (hq + 2 * hk) * d
    pos = _positions(num_tokens, max_pos, seed=num_tokens)
    want_q, want_k = apply_rotary_ref(pos, q, k, cos, sin)
    v_before = v.clone()
    out_q, out_k = apply_rotary(pos, q, k, cos, sin)
    assert out_q is q and out_k is k
    assert_rotary_matches(q, want_q, f"rotary q T={num_tokens} {hq}/{hk}x{d}")
    assert_rotary_matches(k, want_k, f"rotary k T={num_tokens} {hq}/{hk}x{d}")
    assert torch.equal(v, v_before)  # v, past k's last head, untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_contiguous_matches_engine(dtype):
    # Contiguous q/k, and the reference is the engine's RotaryEmbedding.forward itself, run on CPU
    # where it is plain torch (on CUDA it may call this kernel itself).
    rope, cos, sin = _tables(64, 500, theta=10000.0)
    q = _randn(11, 6, 64, dtype=dtype, seed=60)
    k = _randn(11, 2, 64, dtype=dtype, seed=61)
    pos = _positions(11, 500, seed=62)
    want_q, want_k = (t.to(DEVICE) for t in rope(pos.cpu(), q.cpu(), k.cpu()))
    ref_q, ref_k = apply_rotary_ref(pos, q, k, cos, sin)
    assert torch.equal(ref_q, want_q) and torch.equal(ref_k, want_k)
    apply_rotary(pos, q, k, cos, sin)
    assert_rotary_matches(q, want_q, "q vs engine")
    assert_rotary_matches(k, want_k, "k vs engine")


def test_rotary_position_zero_is_identity():
    _, cos, sin = _tables(64, 16)
    _, q, k, _ = _qkv(3, 2, 1, 64, torch.float32, seed=70)
    q0, k0 = q.clone(), k.clone()
    apply_rotary(torch.zeros(3, dtype=torch.int64, device=DEVICE), q, k, cos, sin)
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_rotary_bad_inputs():
    _, cos, sin = _tables(64, 16)
    _, q, k, _ = _qkv(3, 2, 1, 64, torch.float32, seed=71)
    pos = torch.arange(3, device=DEVICE)
    with pytest.raises(AssertionError):
        apply_rotary(pos.int(), q, k, cos, sin)  # positions must be int64
    with pytest.raises(AssertionError):
        apply_rotary(pos[:2], q, k, cos, sin)  # one position per token
    with pytest.raises(AssertionError):
        apply_rotary(pos, q, k[:2], cos, sin)  # q and k token counts
    with pytest.raises(AssertionError):
        apply_rotary(pos, q, k.half(), cos, sin)  # q and k dtypes
    with pytest.raises(AssertionError):
        apply_rotary(pos, q, _randn(3, 1, 32, dtype=torch.float32, seed=72), cos, sin)  # head dims
    with pytest.raises(AssertionError):
        apply_rotary(pos, q, k, cos[:, :32], sin[:, :32])  # table width
    with pytest.raises(AssertionError):
        apply_rotary(pos, q.transpose(1, 2), k, cos, sin)  # last dim not contiguous


# ---------------------------------------------------------------- Llama-3-8B shapes on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestLlama3Shapes:
    HIDDEN, INTER, HQ, HK, D = 4096, 14336, 32, 8, 128
    DT = torch.bfloat16

    @pytest.mark.parametrize("num_tokens", [1, 256, 8192])
    def test_rms_norm(self, num_tokens):
        x = _rows(num_tokens, self.HIDDEN, self.DT, seed=num_tokens)
        res = _rows(num_tokens, self.HIDDEN, self.DT, seed=num_tokens + 1)
        w = (1 + 0.1 * _randn(self.HIDDEN, dtype=torch.float32, seed=2)).to(self.DT)
        assert_matches(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), "rms_norm")
        want_norm, want_sum = fused_add_rms_norm_ref(x, res, w, EPS)
        fused_add_rms_norm(x, res, w, EPS)
        assert torch.equal(res, want_sum)
        assert_matches(x, want_norm, "fused_add_rms_norm")

    @pytest.mark.parametrize("num_tokens", [1, 256, 8192])
    def test_silu_and_mul(self, num_tokens):
        x = _rows(num_tokens, 2 * self.INTER, self.DT, seed=num_tokens)
        assert_matches(silu_and_mul(x), silu_and_mul_ref(x), "silu_and_mul")

    @pytest.mark.parametrize("num_tokens", [1, 256, 8192])
    def test_rotary(self, num_tokens):
        max_pos = 131072
        _, cos, sin = _tables(self.D, max_pos)
        _, q, k, _ = _qkv(num_tokens, self.HQ, self.HK, self.D, self.DT, seed=num_tokens)
        pos = _positions(num_tokens, max_pos, seed=num_tokens)
        want_q, want_k = apply_rotary_ref(pos, q, k, cos, sin)
        apply_rotary(pos, q, k, cos, sin)
        assert_rotary_matches(q, want_q, "q")
        assert_rotary_matches(k, want_k, "k")
