"""`--kv-cache-dtype fp8`: the KV cache in float8 e4m3fn (1 byte an element, static scales 1.0).

Against the model-dtype cache on a tiny random Llama: greedy agreement and logits cosine (close,
not exact); within fp8, every engine path (chunked prefill, preemption + recompute, prefix-cache
hits, batching, prefill export -> decode import) gives exactly the fp8 baseline, since every path
quantizes the same K/V the same way. Memory: the same budget holds 4x the blocks of an fp32 cache
and 2x those of a bf16 one. CPU (torch backend); the GPU test runs the Triton kernels and CUDA
graphs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import LLM
from engine.config import EngineArgs
from engine.scheduler import ScheduledChunk, SchedulerOutput
from tests.engine.helpers import greedy, random_prompts, token_ids
from tests.engine.test_gpu_engine import gpu_model  # noqa: F401  (fixture)

FP8 = torch.float8_e4m3fn
NEW = 16


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return str(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(10, 49152, lo=1, hi=90, seed=17)


def _generate(llm, prompts, new=NEW):
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(new), use_tqdm=False)
    llm.engine.check_invariants()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks, "KV blocks leaked"
    return token_ids(out)


@pytest.fixture(scope="module")
def fp8_baseline(model_dir, prompts):
    return _generate(LLM(model_dir, num_gpu_blocks=512, enable_prefix_caching=False, kv_cache_dtype="fp8"), prompts)


@torch.inference_mode()
def _forced_logits(llm, prompt, forced):
    """Last-position logits after the prompt's prefill, then after each decode step fed the
    tokens `forced` (teacher forcing: both caches see the same tokens), run straight on a fresh
    engine's runner (blocks 1.. are free)."""
    runner = llm.engine.runner
    n = len(prompt)
    blocks = tuple(range(1, -(-(n + len(forced)) // runner.block_size) + 1))
    chunks = [ScheduledChunk(None, tuple(prompt), 0, blocks, True)]
    chunks += [ScheduledChunk(None, (t,), n + i, blocks, True) for i, t in enumerate(forced)]
    return [runner.forward(runner.prepare_inputs(SchedulerOutput((c,))))[0].float() for c in chunks]


def test_fp8_cache_is_one_byte_and_holds_more_blocks(model_dir):
    budget = 1 / 128  # GiB: a whole number of blocks in every dtype
    dense = LLM(model_dir, cpu_kv_cache_gb=budget)
    fp8 = LLM(model_dir, cpu_kv_cache_gb=budget, kv_cache_dtype="fp8")
    k, v = fp8.engine.runner.kv_caches[0]
    assert k.dtype == v.dtype == FP8 and k.element_size() == 1
    assert dense.engine.runner.kv_caches[0][0].dtype == torch.float32
    assert fp8.engine.cache_config.num_blocks == 4 * dense.engine.cache_config.num_blocks  # fp32 -> fp8
    bf16 = LLM(model_dir, cpu_kv_cache_gb=budget, dtype="bfloat16")
    bf16_fp8 = LLM(model_dir, cpu_kv_cache_gb=budget, dtype="bfloat16", kv_cache_dtype="fp8")
    assert bf16_fp8.engine.cache_config.num_blocks == 2 * bf16.engine.cache_config.num_blocks  # twice the blocks
    s = fp8.engine.shape
    assert s.kv_bytes_per_token(FP8) * 4 == s.kv_bytes_per_token(torch.float32)


def test_fp8_capacity_is_reported_when_the_sequence_cap_binds(model_dir):
    # A budget far above max_num_seqs full sequences: both caches allocate only what those can use
    # (the same count), but the capacity the budget fits (kv_blocks_fit, logged) is twice as large.
    kw = dict(cpu_kv_cache_gb=0.25, dtype="bfloat16", max_num_seqs=2, max_model_len=64)
    bf16, fp8 = LLM(model_dir, **kw), LLM(model_dir, kv_cache_dtype="fp8", **kw)
    assert bf16.engine.cache_config.num_blocks == fp8.engine.cache_config.num_blocks < bf16.engine.kv_blocks_fit
    assert fp8.engine.kv_blocks_fit == 2 * bf16.engine.kv_blocks_fit


def test_fp8_close_to_dense(model_dir, prompts, fp8_baseline):
    dense = _generate(LLM(model_dir, num_gpu_blocks=512, enable_prefix_caching=False), prompts)
    # Free-running greedy: a tiny random model's top two logits are close (its logits have std
    # ~0.8 over 49k tokens), so one flip changes the rest of the sequence; recorded, not bounded.
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(dense, fp8_baseline)]
    # Teacher-forced (both caches fed the dense greedy tokens): logits cosine at every position
    # and argmax agreement.
    cos, agree, total = [], 0, 0
    dense_llm, fp8_llm = LLM(model_dir, num_gpu_blocks=64), LLM(model_dir, num_gpu_blocks=64, kv_cache_dtype="fp8")
    for p, forced in zip(prompts, dense):
        ref = _forced_logits(dense_llm, p, forced[:-1])
        got = _forced_logits(fp8_llm, p, forced[:-1])
        cos += [float(F.cosine_similarity(a, b, dim=0)) for a, b in zip(ref, got)]
        agree += sum(int(a.argmax() == b.argmax()) for a, b in zip(ref, got))
        total += len(ref)
    print(f"fp8 KV vs fp32 KV: logits cosine min {min(cos):.5f} mean {sum(cos) / len(cos):.5f}; "
          f"teacher-forced argmax agreement {agree}/{total}; free-running first divergence {firsts}")
    assert min(cos) >= 0.99, min(cos)
    assert agree >= 0.85 * total, (agree, total)  # measured 142 / 160 (the rest: near-ties)


@pytest.mark.parametrize("how", ["chunked", "preempted", "batched_alone", "max_num_seqs_1"])
def test_fp8_paths_match_fp8_baseline(model_dir, prompts, fp8_baseline, how):
    kw = dict(kv_cache_dtype="fp8", enable_prefix_caching=False, num_gpu_blocks=512)
    if how == "chunked":
        out = _generate(LLM(model_dir, max_num_batched_tokens=13, **kw), prompts)
    elif how == "preempted":
        kw["num_gpu_blocks"] = 15  # ~75 blocks wanted: constant preemption and recompute
        llm = LLM(model_dir, **kw)
        out = _generate(llm, prompts)
        assert llm.engine.scheduler.num_preemptions > 0
    elif how == "batched_alone":
        llm = LLM(model_dir, **kw)
        out = [_generate(llm, [p])[0] for p in prompts]
    else:
        out = _generate(LLM(model_dir, max_num_seqs=1, **kw), prompts)
    assert out == fp8_baseline


def test_fp8_prefix_cache_hit_matches_miss(model_dir):
    shared = random_prompts(1, 49152, lo=50, hi=50, seed=3)[0]  # 3 full blocks + 2 tokens
    tails = random_prompts(4, 49152, lo=3, hi=9, seed=4)
    prompts = [shared + t for t in tails]
    miss = _generate(LLM(model_dir, num_gpu_blocks=128, enable_prefix_caching=False, kv_cache_dtype="fp8"), prompts)
    llm = LLM(model_dir, num_gpu_blocks=128, enable_prefix_caching=True, kv_cache_dtype="fp8")
    first = llm.generate([{"prompt_token_ids": prompts[0]}], greedy(NEW), use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], greedy(NEW), use_tqdm=False)
    assert [r.num_cached_tokens for r in rest] == [48, 48, 48]
    assert token_ids(first + rest) == miss


def test_fp8_prefill_export_decode_import(model_dir, prompts, fp8_baseline):
    from engine.llm_engine import LLMEngine

    pre = LLMEngine(EngineArgs(model=model_dir, role="prefill", num_gpu_blocks=256, kv_cache_dtype="fp8"))
    dec = LLMEngine(EngineArgs(model=model_dir, role="decode", num_gpu_blocks=256, kv_cache_dtype="fp8"))
    params = greedy(NEW)
    for i, p in enumerate(prompts):
        pre.add_request(str(i), prompt_token_ids=p, params=params)
    firsts = {}
    while pre.has_unfinished_requests():
        for out in pre.step():
            firsts[out.request_id] = out.new_token_ids[0]
    s = pre.shape
    for rid, first in firsts.items():
        kv = pre.export_kv(rid)
        blocks = -(-kv.num_tokens // 16)
        assert kv.k.dtype == kv.v.dtype == FP8
        # 1 byte an element: a quarter of the fp32 cache's bytes (half of a bf16 one's).
        assert kv.k.nbytes == s.num_layers * blocks * 16 * s.num_kv_heads * s.head_dim
        dec.import_request(rid, kv.prompt_token_ids, first, params, kv.k, kv.v)
    got = {rid: [first] for rid, first in firsts.items()}
    while dec.has_unfinished_requests():
        for out in dec.step():
            got[out.request_id].extend(out.new_token_ids)
    assert [got[str(i)] for i in range(len(prompts))] == fp8_baseline
    dec.check_invariants()


def test_fp8_decode_refuses_dense_blocks_and_vice_versa(model_dir):
    from engine.llm_engine import LLMEngine

    for kv_dtype, sent in (("fp8", torch.float32), ("auto", FP8)):
        dec = LLMEngine(EngineArgs(model=model_dir, role="decode", num_gpu_blocks=32, kv_cache_dtype=kv_dtype))
        s = dec.shape
        blocks = torch.zeros(s.num_layers, 1, 16, s.num_kv_heads, s.head_dim, dtype=sent)
        free = dec.block_manager.num_free_blocks
        with pytest.raises(ValueError, match="same --kv-cache-dtype"):
            dec.import_request("x", [1, 2, 3], 4, greedy(3), blocks, blocks)
        assert dec.block_manager.num_free_blocks == free


def test_kv_cache_dtype_is_validated():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        EngineArgs(kv_cache_dtype="fp8_e5m2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_gpu_triton_and_cuda_graphs(gpu_model, prompts):
    # bf16 model; the Triton backend writes and reads the fp8 cache; decode steps replay CUDA graphs.
    # The GPU machine has no default model: a tiny random Llama with a word-level tokenizer.
    model_dir = str(gpu_model("llama"))
    kw = dict(device="cuda", dtype="bfloat16", num_gpu_blocks=512, enable_prefix_caching=False)
    dense = LLM(model_dir, **kw)
    fp8 = LLM(model_dir, kv_cache_dtype="fp8", **kw)
    assert fp8.engine.runner.graphs is not None and fp8.engine.runner.kv_caches[0][0].dtype == FP8
    a, b = _generate(dense, prompts), _generate(fp8, prompts)
    # Graphs replay the same kernels: token-identical to eager in fp32 compute (in bf16 the graph's
    # fixed split count vs eager's heuristic one flips a near-tie: 1 of 10 prompts on the H200).
    f32 = dict(kw, dtype="float32", kv_cache_dtype="fp8")
    assert _generate(LLM(model_dir, enforce_eager=True, **f32), prompts) == _generate(LLM(model_dir, **f32), prompts)
    # Teacher-forced, as on CPU: free-running greedy agreement on a random model is a coin toss once
    # one near-tie flips (0.54 on the H200, 2026-12-03), so it is printed, not asserted.
    cos, agree, total = [], 0, 0
    for p, forced in zip(prompts, a):
        ref = _forced_logits(dense, p, forced[:-1])  # their blocks are free again after _generate
        got = _forced_logits(fp8, p, forced[:-1])
        cos += [float(F.cosine_similarity(r, g, dim=0)) for r, g in zip(ref, got)]
        agree += sum(int(r.argmax() == g.argmax()) for r, g in zip(ref, got))
        total += len(ref)
    free = sum(x == y for u, w in zip(a, b) for x, y in zip(u, w)) / sum(map(len, a))
    print(f"fp8 vs bf16 KV on CUDA: cosine min {min(cos):.5f}; forced argmax {agree}/{total}; free-running {free:.2f}")
    assert min(cos) >= 0.99, min(cos)
    assert agree >= 0.85 * total, (agree, total)


@pytest.mark.slow
def test_fp8_tensor_parallel_and_kv_between_tp_sizes(make_tiny_model):
    """TP=2 with an fp8 cache (gloo on CPU; the collectives move its bytes) == TP=1 fp8, and fp8
    KV moves P TP=2 -> D TP=1 and P TP=1 -> D TP=2 to the same output."""
    from engine.llm_engine import LLMEngine
    from tests.engine.test_tp import ENGINE, NEW as TP_NEW, _disaggregated

    path = str(make_tiny_model("qwen2"))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, 49152, lo=3, hi=40, seed=3)]

    def run(tp):
        with LLM(path, tensor_parallel_size=tp, kv_cache_dtype="fp8", **ENGINE) as llm:
            return token_ids(llm.generate(prompts, greedy(TP_NEW), use_tqdm=False))

    colocated = run(1)
    assert run(2) == colocated

    def engine(role, tp):
        return LLMEngine(EngineArgs(model=path, role=role, tensor_parallel_size=tp, kv_cache_dtype="fp8", **ENGINE))

    p1, d1, p2, d2 = engine("prefill", 1), engine("decode", 1), engine("prefill", 2), engine("decode", 2)
    try:
        assert _disaggregated(p2, d1, prompts) == colocated
        assert _disaggregated(p1, d2, prompts) == colocated
    finally:
        p2.close()
        d2.close()
