"""Skinny (decode) GEMM `x @ W^T` vs F.linear.

On CPU the kernels run under Triton's interpreter (conftest.py) at small odd shapes in fp32 and
fp16 (the interpreter's bf16 `tl.dot` and casts are not faithful), M up to 64; the GPU class runs
the real Llama-3-8B and SmolLM2-135M shapes in bf16 against F.linear in fp32 of the same bf16
inputs, M in 1..16 and 17 / 32 / 64 (table, explicit wide configs, cuBLAS fallback).
"""
import pytest
import torch

from kernels.skinny_gemm import (
    KERNEL_MAX_M,
    MAX_M,
    SKINNY_CONFIGS,
    SkinnyConfig,
    default_config,
    dot_block_m,
    pick_config,
    skinny_gemm,
    skinny_gemm_bytes,
    skinny_gemm_floor_us,
    skinny_gemm_ref,
    skinny_wins,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

# Every inner loop, with and without split-K, with blocks that do not divide N = 200 or K = 96.
SMALL_CONFIGS = [
    SkinnyConfig("dot", 64, 32, 1),
    SkinnyConfig("dot", 32, 64, 2),  # K = 96: one full and one masked K block per split
    SkinnyConfig("dot", 16, 32, 3),
    SkinnyConfig("fma", 32, 32, 1),
    SkinnyConfig("fma", 16, 64, 2),
    SkinnyConfig("fma", 8, 32, 5),  # 5 splits of 3 K blocks: last split empty -> 3 effective
]


def _inputs(m, n, k, dtype, seed, device=DEV):
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: 0.5 G elements at lm_head
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    w = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(dtype)
    return x, w


def _check_close(out, x, w, what=""):
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) outputs"
    ref = skinny_gemm_ref(x.double(), w.double())
    if out.dtype == torch.float32:
        rtol, atol = 1e-5, 1e-5
    else:  # one rounding of the fp32 accumulator to the 16-bit dtype
        rtol, atol = (2.0**-9 if out.dtype == torch.float16 else 2.0**-7), 1e-3
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * ref.abs().max().item(),
                               msg=lambda m: f"{what}: {m}")


def _poisoned(m, n, dtype, device=DEV):
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=lambda c: c.short())
def test_small_odd_shapes(cfg, m, dtype):
    if cfg.kind == "fma" and m > 4:
        pytest.skip("the fma kind handles M <= 4")
    x, w = _inputs(m, 200, 96, dtype, seed=m)
    out = skinny_gemm(x, w, out=_poisoned(m, 200, dtype), config=cfg)
    _check_close(out, x, w, cfg.short())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [17, 33, 64])
@pytest.mark.parametrize("cfg", [c for c in SMALL_CONFIGS if c.kind == "dot"], ids=lambda c: c.short())
def test_wide_m_small_odd_shapes(cfg, m, dtype):
    # M > 16: x padded (clamped rows) to BLOCK_M = 32 or 64, split-K included.
    x, w = _inputs(m, 200, 96, dtype, seed=m + 40)
    out = skinny_gemm(x, w, out=_poisoned(m, 200, dtype), config=cfg)
    _check_close(out, x, w, f"{cfg.short()} m={m}")


def test_wide_m_fallback_untuned_shape():
    # An untuned shape at M > 16: pick_config says cuBLAS, skinny_gemm is F.linear (out too).
    x, w = _inputs(24, 200, 96, torch.float32, seed=9)
    assert pick_config(24, 200, 96) is None and not skinny_wins(24, 200, 96)
    assert torch.equal(skinny_gemm(x, w), torch.nn.functional.linear(x, w))
    out = _poisoned(24, 200, torch.float32)
    assert skinny_gemm(x, w, out=out) is out
    assert torch.equal(out, torch.nn.functional.linear(x, w))


@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=lambda c: c.short())
def test_split_runs_twice_identically(cfg):
    # The semaphores reset themselves: a second call (and a third shape) works and agrees bitwise.
    x, w = _inputs(5 if cfg.kind != "fma" else 2, 200, 96, torch.float32, seed=7)
    a = skinny_gemm(x, w, config=cfg)
    x2, w2 = _inputs(3 if cfg.kind != "fma" else 1, 72, 160, torch.float32, seed=8)
    _check_close(skinny_gemm(x2, w2, config=cfg), x2, w2, "other shape")
    b = skinny_gemm(x, w, config=cfg)
    assert torch.equal(a, b)


def test_even_k_and_strided_rows():
    # K a multiple of BLOCK_K (unmasked loop), x a row-strided view, out a row-strided view.
    x_big, w = _inputs(4, 130, 256, torch.float32, seed=3)
    x = x_big.new_empty(4, 384)[:, :256]
    x.copy_(x_big)
    out_big = _poisoned(4, 160, torch.float32)
    out = out_big[:, :130]
    for cfg in (SkinnyConfig("dot", 64, 64, 2), SkinnyConfig("fma", 16, 128, 1)):
        out.fill_(float("nan"))
        skinny_gemm(x, w, out=out, config=cfg)
        _check_close(out, x, w, cfg.short())
        assert torch.isnan(out_big[:, 130:]).all()  # nothing written past N


@pytest.mark.parametrize("m", [1, 3])
def test_default_config_smollm_shape(m):
    # SmolLM2-135M's q/o projection shape through the default rule (K = 576 = 2.25 x 256).
    x, w = _inputs(m, 576, 576, torch.float32, seed=m + 20)
    out = skinny_gemm(x, w, out=_poisoned(m, 576, torch.float32))
    _check_close(out, x, w, "default")


def test_empty_rows():
    x, w = _inputs(0, 64, 32, torch.float32, seed=1)
    assert skinny_gemm(x, w).shape == (0, 64)


def test_bad_inputs():
    x, w = _inputs(2, 64, 32, torch.float32, seed=1)
    with pytest.raises(AssertionError):
        skinny_gemm(x, w.half())  # dtype mismatch
    with pytest.raises(AssertionError):
        skinny_gemm(x, w.t().contiguous().t())  # non-contiguous weight
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(65, 32, device=DEV), w, config=SkinnyConfig("dot", 64, 32))  # M > 64
    with pytest.raises(AssertionError):
        skinny_gemm(x, w[:, :16])  # K mismatch
    with pytest.raises(AssertionError):
        skinny_gemm(x, w, out=torch.empty(2, 63, device=DEV))  # wrong out shape
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(8, 32, device=DEV), w, config=SkinnyConfig("fma", 16, 32))  # fma, M > 4


def test_config_table_and_rules():
    assert MAX_M in (16, KERNEL_MAX_M) and KERNEL_MAX_M == 64
    assert [dot_block_m(m) for m in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]
    for (n, k), entries in SKINNY_CONFIGS.items():
        small = [e for e in entries if e[0] <= 16]
        assert small and small[-1][0] == 16, (n, k)  # M <= 16 fully covered, as before
        assert entries[-1][0] == KERNEL_MAX_M, (n, k)  # 17..64 covered (config or None)
        assert [e[0] for e in entries] == sorted(e[0] for e in entries)
        for max_m, cfg in entries:
            assert cfg is not None or max_m > 16, (n, k)
            assert cfg is None or cfg.kind in ("dot", "fma")
            assert cfg is None or cfg.kind != "fma" or max_m <= 4, (n, k, cfg)
        for m in range(1, 17):
            assert pick_config(m, n, k) in [c for _, c in small]
            assert skinny_wins(m, n, k)
        for m in range(17, KERNEL_MAX_M + 1):
            cfg = pick_config(m, n, k)
            assert cfg in [c for mm, c in entries if mm > 16]
            assert skinny_wins(m, n, k) == (cfg is not None)
            assert MAX_M == 16 or cfg is not None  # MAX_M = 64 only if every tuned shape wins
        assert pick_config(KERNEL_MAX_M + 1, n, k) is None and not skinny_wins(KERNEL_MAX_M + 1, n, k)
    assert pick_config(17, 1000, 1000) is None  # untuned shape above 16 rows: cuBLAS
    assert default_config(1, 4096, 14336) == SkinnyConfig("fma", 8, 512, 1, 4, 2)
    assert default_config(2, 4096, 14336) == SkinnyConfig("fma", 4, 512, 1, 2, 2)
    assert default_config(8, 4096, 14336) == SkinnyConfig("dot", 64, 128, 1, 4, 8)
    cfg = default_config(3, 576, 576)  # SmolLM2: 9 tiles, K split to fill more SMs
    assert cfg.kind == "dot" and 576 % cfg.block_k == 0 and cfg.split_k > 1
    assert default_config(1, 576, 576).block_k == 256  # masked tail rather than tiny tiles
    assert pick_config(1, 1000, 1000) == default_config(1, 1000, 1000)
    assert skinny_gemm_bytes(1, 4096, 4096) == 2 * (4096 * 4096 + 4096 + 4096)
    assert 10 < skinny_gemm_floor_us(1, 4096, 4096) < 12  # 33.6 MB at 3.08 TB/s


# ----------------------------------------------------------------------------------------------
# real shapes, bf16, on a GPU

LLAMA = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
         "down": (4096, 14336), "lm_head": (128256, 4096)}
SMOL = {"smol_q": (576, 576), "smol_kv": (960, 576), "smol_gate_up": (3072, 576),
        "smol_down": (576, 1536), "smol_lm_head": (49152, 576)}
REAL = {**LLAMA, **SMOL}


def _check_bf16(out, x, w, what):
    # fp32-accumulated bf16: vs F.linear in fp32 of the same bf16 inputs, one bf16 rounding
    # (2^-9 relative) plus fp32 summation-order noise.
    assert not torch.isnan(out).any(), f"{what}: NaN"
    ref = skinny_gemm_ref(x.float(), w.float())
    err = (out.float() - ref).abs()
    bound = 2.0**-8 * ref.abs() + 1e-3 * ref.abs().max()
    assert (err <= bound).all(), f"{what}: max err {err.max().item():.3g}, worst excess " \
                                 f"{(err - bound).max().item():.3g}"
    rel = (err.norm() / ref.norm()).item()
    assert rel < 3e-3, f"{what}: relative error {rel:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
class TestGpuRealShapes:
    @pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 32, 64])
    @pytest.mark.parametrize("name", sorted(REAL))
    def test_table_configs(self, name, m):
        n, k = REAL[name]
        x, w = _inputs(m, n, k, torch.bfloat16, seed=len(name) * 100 + m)
        out = skinny_gemm(x, w, out=_poisoned(m, n, torch.bfloat16))
        cfg = pick_config(m, n, k)
        _check_bf16(out, x, w, f"{name} m={m} {cfg.short() if cfg else 'cuBLAS'}")

    @pytest.mark.parametrize("cfg", [
        SkinnyConfig("dot", 128, 128, 1, 8, 4), SkinnyConfig("dot", 128, 64, 1, 4, 6),
        SkinnyConfig("dot", 64, 128, 2, 4, 4),
    ], ids=lambda c: c.short())
    @pytest.mark.parametrize("name", sorted(LLAMA))
    def test_wide_m(self, name, cfg):
        # M in 17..64 (x padded to 32 / 64 rows), explicit configs, split-K included.
        n, k = LLAMA[name]
        for m in (17, 32, 64):
            x, w = _inputs(m, n, k, torch.bfloat16, seed=m + 11)
            out = skinny_gemm(x, w, out=_poisoned(m, n, torch.bfloat16), config=cfg)
            _check_bf16(out, x, w, f"{name} m={m} {cfg.short()}")

    @pytest.mark.parametrize("cfg", [
        SkinnyConfig("dot", 64, 256, 4, 4, 4), SkinnyConfig("dot", 128, 128, 1, 8, 4),
        SkinnyConfig("fma", 8, 512, 3, 4, 2),
    ], ids=lambda c: c.short())
    @pytest.mark.parametrize("name", ["down", "smol_lm_head"])
    def test_every_kind(self, name, cfg):
        n, k = REAL[name]
        for m in ([1, 3] if cfg.kind == "fma" else [1, 16]):
            x, w = _inputs(m, n, k, torch.bfloat16, seed=m)
            out = skinny_gemm(x, w, out=_poisoned(m, n, torch.bfloat16), config=cfg)
            _check_bf16(out, x, w, f"{name} m={m} {cfg.short()}")

    @pytest.mark.parametrize("cfg", [None, SkinnyConfig("dot", 64, 256, 4, 4, 4),
                                     SkinnyConfig("fma", 8, 512, 3, 4, 2)],
                             ids=lambda c: c.short() if c else "table")
    def test_deterministic_and_graph_capturable(self, cfg):
        n, k = LLAMA["down"]
        # M = 17 / 64 through the table only (its split-K configs there; 64 x 256 x 4 stages
        # overflows shared memory once x is 64 rows)
        for m in ((1, 8, 17, 64) if cfg is None else (1, 8) if cfg.kind != "fma" else (1, 3)):
            x, w = _inputs(m, n, k, torch.bfloat16, seed=5)
            first = skinny_gemm(x, w, config=cfg)  # eager first: allocates the split-K workspace
            out = torch.empty_like(first)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                skinny_gemm(x, w, out=out, config=cfg)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(3):  # back to back: the semaphores reset between calls
                    skinny_gemm(x, w, out=out, config=cfg)
            for seed in (6, 7):
                x2, _ = _inputs(m, n, k, torch.bfloat16, seed=seed)
                x.copy_(x2)
                out.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, skinny_gemm(x, w, config=cfg)), "graph replay != eager"
                _check_bf16(out, x, w, f"graph m={m}")
            again = skinny_gemm(x, w, config=cfg)
            assert torch.equal(again, skinny_gemm(x, w, config=cfg)), "not deterministic"
