"""FP8 (e4m3fn) KV cache: the write kernel quantizes exactly as the torch path does, and the paged
decode / prefill kernels read the 1-byte cache as well as the torch reference reads its
dequantized copy. CPU: Triton's interpreter (fp32 / fp16 queries); CUDA: bf16 too, real shapes."""
import pytest
import torch

from kernels.kv_cache_write import (FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8, write_kv_cache,
                                    write_kv_cache_ref)
from kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from tests.kernels.paged_case import DEVICE, DTYPES, GQA, assert_within_budget, make_case, poisoned_like

CUDA = torch.cuda.is_available()
# (k_scale, v_scale): vLLM's default, and scales that are not powers of two.
SCALES = [(1.0, 1.0), (0.37, 0.0213)]


def _bytes(t):
    return t.view(torch.uint8)


def _interpreter_rounding_slips(x, got, want):
    """Triton's interpreter converts fp32 -> e4m3 with its own rounding: half up, subnormals
    truncated, and the carry dropped when rounding up overflows the mantissa (127.5 -> 64, not
    128); the GPU's cvt.rn.satfinite rounds to nearest even like torch. True where `got` differs
    from `want` (torch's) only in those ways: by at most one e4m3 step, or by that carry."""
    x, got, want = x.double(), got.double(), want.double()
    exp = torch.frexp(want.abs())[1]
    step = torch.exp2((exp - 4).clamp_min(-9).double())  # 3 mantissa bits; subnormal step 2^-9
    near = (got - want).abs() <= step
    carry = (torch.frexp(want.abs())[0] == 0.5) & (x.abs() < want.abs()) & (got == want / 2)
    return near | carry


def _to_fp8(case, k_scale, v_scale):
    """The case with its caches quantized (NaN poison stays NaN: e4m3fn has a NaN)."""
    case.k_cache = quantize_fp8(case.k_cache, k_scale)
    case.v_cache = quantize_fp8(case.v_cache, v_scale)
    return case


def _dequantized(case, dtype, k_scale, v_scale):
    return dequantize_fp8(case.k_cache, k_scale, dtype), dequantize_fp8(case.v_cache, v_scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(3, 64), (1, 128)])
def test_fp8_write_matches_torch_bytes(dtype, k_scale, v_scale, num_kv_heads, head_dim):
    case = make_case([1, 9, 23], [5, 9, 40], num_kv_heads, num_kv_heads, head_dim, dtype=dtype,
                     write_new=False, pad_tokens=2, seed=21)
    case.k = case.k * 300  # some of it past +-448 / k_scale: saturates
    k_cache = torch.zeros(case.k_cache.shape, dtype=FP8_DTYPE, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(case.k, case.v, k_ref, v_ref, case.slot_mapping, k_scale, v_scale)
    write_kv_cache(case.k, case.v, k_cache, v_cache, case.slot_mapping, k_scale, v_scale)
    real = case.slot_mapping[: case.num_real_tokens]
    if CUDA:  # the same bytes as the torch path
        assert torch.equal(_bytes(k_cache), _bytes(k_ref)) and torch.equal(_bytes(v_cache), _bytes(v_ref))
    else:
        for x, scale, got, want in ((case.k, k_scale, k_cache, k_ref), (case.v, v_scale, v_cache, v_ref)):
            got = got.view(-1, num_kv_heads, head_dim)[real].float()
            want = want.view(-1, num_kv_heads, head_dim)[real].float()
            x = x[: case.num_real_tokens].float() * torch.tensor(1 / scale, dtype=torch.float32)
            differ = got != want
            assert _interpreter_rounding_slips(x, got, want)[differ].all()
            assert differ.float().mean() < 0.15, differ.float().mean()  # bf16 input: many ties
        assert torch.equal(_bytes(k_cache).eq(0), _bytes(k_ref).eq(0))  # the same slots written
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)[real].float()
    assert flat_k.abs().max() == FP8_MAX and not flat_k.isnan().any()  # saturated, never NaN
    flat_k = k_ref.view(-1, num_kv_heads, head_dim)[real].float()  # the torch path's rounding error:
    x = case.k[: case.num_real_tokens].float() / k_scale
    inside = x.abs() < FP8_MAX
    rel = ((flat_k - x).abs() / x.abs().clamp_min(2**-6))[inside]
    assert rel.max() <= 2**-4 + 1e-6  # e4m3: 3 mantissa bits, round to nearest
    assert _bytes(k_cache[0]).eq(0).all()  # the padding tokens wrote nothing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("num_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_decode_matches_ref(dtype, k_scale, v_scale, num_heads, num_kv_heads, num_splits):
    lens = [37, 1, 16, 130, 5]
    case = _to_fp8(make_case([1] * len(lens), lens, num_heads, num_kv_heads, 64, dtype=dtype, seed=22),
                   k_scale, v_scale)
    scale = 64**-0.5
    out = poisoned_like(case.q)
    paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale, out,
                           num_splits=num_splits, k_scale=k_scale, v_scale=v_scale, block_n=32)
    k32, v32 = _dequantized(case, torch.float32, k_scale, v_scale)
    ref32 = paged_decode_attention_ref(case.q.float(), k32, v32, case.block_tables, case.seq_lens, scale)
    ref_dt = paged_decode_attention_ref(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens,
                                        scale, k_scale=k_scale, v_scale=v_scale)
    assert_within_budget(out, ref32, ref_dt, f"fp8 decode splits={num_splits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (5, 1)])
def test_fp8_prefill_matches_ref(dtype, k_scale, v_scale, num_heads, num_kv_heads):
    query_lens, seq_lens = [1, 21, 40, 0, 3], [37, 21, 90, 12, 19]
    case = _to_fp8(make_case(query_lens, seq_lens, num_heads, num_kv_heads, 64, dtype=dtype, seed=23),
                   k_scale, v_scale)
    scale = 64**-0.5
    args = (case.query_start_loc, case.seq_lens, case.block_tables, scale)
    out = poisoned_like(case.q)
    paged_prefill_attention(case.q, case.k_cache, case.v_cache, *args, case.max_query_len, out,
                            k_scale=k_scale, v_scale=v_scale)
    k32, v32 = _dequantized(case, torch.float32, k_scale, v_scale)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args)
    ref_dt = paged_prefill_attention_ref(case.q, case.k_cache, case.v_cache, *args, k_scale=k_scale, v_scale=v_scale)
    n = case.num_real_tokens
    assert_within_budget(out[:n], ref32[:n], ref_dt[:n], "fp8 prefill")


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32] if CUDA else [torch.bfloat16])
def test_fp8_decode_with_fp16_dots_takes_queries_past_fp16s_range(q_dtype):
    # An fp8 cache's dots run in fp16, whose largest value is 65504: rows of q far past it (a
    # bf16 / fp32 query can hold them) must give the reference's output, not inf / NaN.
    lens = [37, 1, 130]
    case = _to_fp8(make_case([1] * len(lens), lens, 8, 2, 64, dtype=torch.float32, seed=31), 0.37, 0.0213)
    q = case.q.clone()
    q[0, :4] *= 3e5  # kv head 0's group: up to about 1e6
    q[2, 5] *= 1e4  # one head of kv head 1's group
    q = q.to(q_dtype)
    scale = 64**-0.5 / 3e5  # keeps the softmax well spread for the big rows
    out = torch.empty_like(q)
    paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale, out,
                           k_scale=0.37, v_scale=0.0213, fp8_compute=torch.float16)
    k32, v32 = _dequantized(case, torch.float32, 0.37, 0.0213)
    ref = paged_decode_attention_ref(q.float(), k32, v32, case.block_tables, case.seq_lens, scale)
    assert torch.isfinite(out.float()).all()
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(1), ref.flatten(1), dim=1)
    assert cos.min() > 0.999, cos


def test_fp8_attention_close_to_unquantized():
    # The quantization error itself: decode over an fp8 cache vs the fp32 cache it came from.
    lens = [200, 77, 1]
    case = make_case([1] * len(lens), lens, 8, 2, 64, seed=24)
    ref = paged_decode_attention_ref(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, 0.125)
    _to_fp8(case, 1.0, 1.0)
    out = paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, 0.125)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1)
    assert cos.min() > 0.995, cos
    # No worse than one e4m3 rounding (<= 2^-4 relative) of the largest V element (the 1-token row
    # returns its V itself).
    assert (out - ref).abs().max() <= 2**-4 * case.v[: case.num_real_tokens].abs().max()


def test_fp8_scales_refused_for_a_dense_cache():
    case = make_case([1], [5], 4, 4, 64, seed=25)
    with pytest.raises(AssertionError, match="fp8 cache only"):
        paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, 0.125,
                               k_scale=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_real_shapes_gpu(dtype):
    # Llama-3-8B attention shape: 32 query / 8 kv heads, head_dim 128; long and mixed rows.
    heads, kv, d = 32, 8, 128
    scale = d**-0.5
    lens = [32768, 1, 4095, 17, 9000, 2048, 1, 300]
    case = _to_fp8(make_case([1] * len(lens), lens, heads, kv, d, dtype=dtype, seed=26), 1.0, 1.0)
    k32, v32 = _dequantized(case, torch.float32, 1.0, 1.0)
    ref32 = paged_decode_attention_ref(case.q.float(), k32, v32, case.block_tables, case.seq_lens, scale)
    ref_dt = paged_decode_attention_ref(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale)
    for splits in (None, 1):
        out = poisoned_like(case.q)
        paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.seq_lens, scale, out,
                               num_splits=splits)
        assert_within_budget(out, ref32, ref_dt, f"fp8 decode gpu splits={splits}")
    query_lens, seq_lens = [4096, 1, 1000, 17, 300], [4096, 5000, 3000, 17, 8000]
    case = _to_fp8(make_case(query_lens, seq_lens, heads, kv, d, dtype=dtype, seed=27), 0.5, 0.25)
    args = (case.query_start_loc, case.seq_lens, case.block_tables, scale)
    out = poisoned_like(case.q)
    paged_prefill_attention(case.q, case.k_cache, case.v_cache, *args, case.max_query_len, out,
                            k_scale=0.5, v_scale=0.25)
    k32, v32 = _dequantized(case, torch.float32, 0.5, 0.25)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args)
    ref_dt = paged_prefill_attention_ref(case.q, case.k_cache, case.v_cache, *args, k_scale=0.5, v_scale=0.25)
    n = case.num_real_tokens
    assert_within_budget(out[:n], ref32[:n], ref_dt[:n], "fp8 prefill gpu")


@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("step", ["decode", "prefill", "mixed"])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fp8_backend_writes_then_attends(backend_name, step, k_scale, v_scale):
    # The engine's path: plan() + forward() writes the step's K/V into an fp8 cache, then attends
    # over it; checked against the reference over that cache, dequantized.
    from engine.attention import get_backend_class
    from tests.kernels.test_attention_backends import STEPS, _metadata

    num_heads, num_kv_heads, head_dim, dtype = 8, 2, 64, torch.float16
    query_lens, seq_lens = STEPS[step]
    case = _to_fp8(make_case(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype=dtype,
                             write_new=False, pad_tokens=2, seed=28), k_scale, v_scale)
    k_want, v_want = case.k_cache.clone(), case.v_cache.clone()
    write_kv_cache_ref(case.k, case.v, k_want, v_want, case.slot_mapping, k_scale, v_scale)
    backend = get_backend_class(backend_name)(num_heads, num_kv_heads, head_dim, head_dim**-0.5)
    backend.set_kv_scales(k_scale, v_scale)
    backend.plan(_metadata(case))
    out = backend.forward(case.q, case.k, case.v, case.k_cache, case.v_cache)
    if backend_name == "torch" or CUDA:  # the same bytes (the interpreter rounds its own way)
        assert torch.equal(_bytes(case.k_cache), _bytes(k_want)) and torch.equal(_bytes(case.v_cache), _bytes(v_want))
    scale = head_dim**-0.5
    args = (case.query_start_loc, case.seq_lens, case.block_tables, scale)
    k32, v32 = _dequantized(case, torch.float32, k_scale, v_scale)
    ref32 = paged_prefill_attention_ref(case.q.float(), k32, v32, *args)
    ref_dt = paged_prefill_attention_ref(case.q, case.k_cache, case.v_cache, *args, k_scale=k_scale, v_scale=v_scale)
    n = case.num_real_tokens
    assert out.dtype == dtype
    assert_within_budget(out[:n], ref32[:n], ref_dt[:n], f"{backend_name} fp8 {step}")
