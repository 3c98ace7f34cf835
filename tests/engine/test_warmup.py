"""Warm-up (engine/warmup.py): what it plans, and that it leaves the engine as it found it.

CPU: the plan's coverage and bounds; a full warm-up of a tiny model leaves every block free, the
prefix cache empty, its counters at 0, the null block and the random generators as they were,
and greedy output identical to an engine that never warmed up; the prefill tile lists are
16-byte aligned (one kernel per tile class); a node started with --warmup logs it and its
startup time. CUDA: after a full warm-up, a workload of odd prompt sizes, batch sizes and sampler
settings makes Triton compile nothing more.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.warmup import MODES, plan_steps, resolve_mode, sampler_paths, warm_up
from tests.engine.helpers import greedy, random_prompts, token_ids

KW = dict(device="cpu", dtype="float32", num_gpu_blocks=64, max_model_len=128, max_num_seqs=8,
          max_num_batched_tokens=64)


def test_modes():
    assert resolve_mode("auto", torch.device("cuda")) == "full"
    assert resolve_mode("auto", torch.device("cpu")) == "minimal"
    for m in ("full", "minimal", "off"):
        assert resolve_mode(m, torch.device("cpu")) == m
    with pytest.raises(ValueError, match="warm-up mode"):
        resolve_mode("fast", torch.device("cpu"))
    assert set(MODES) == {"auto", "full", "minimal", "off"}
    assert plan_steps("off", budget=64, max_num_seqs=8, max_model_len=128) == []
    assert sampler_paths("off", 8) == []


def test_full_plan_covers_the_shape_classes_within_bounds():
    budget, seqs, max_len = 8192, 256, 4096
    steps = plan_steps("full", budget=budget, max_num_seqs=seqs, max_model_len=max_len, graph_max_batch=256)
    prefill_sizes = {s.num_tokens for s in steps if s.kind == "prefill"}
    assert set(range(1, 17)) <= prefill_sizes  # every skinny-GEMM row count
    assert {32, 64, 128, 256, 512, 1024, 2048, 4096, 8192} <= prefill_sizes  # powers of two to the budget
    assert {len(s.rows) for s in steps if s.kind == "rows"} == set(range(2, 17))  # LM-head rows 2..16
    assert any(s.kind == "mixed" for s in steps)
    assert not any(s.kind == "decode" for s in steps)  # every batch size is graphed
    for s in steps:
        assert s.num_tokens <= budget and len(s.rows) <= seqs
        assert all(start + q <= max_len - 1 for q, start in s.rows)  # a row never reaches max_model_len
    assert len(steps) < 50  # bounded

    eager = plan_steps("full", budget=budget, max_num_seqs=seqs, max_model_len=max_len, graph_max_batch=0)
    decode = [s for s in eager if s.kind == "decode"]
    assert {len(s.rows) for s in decode} == {1, 2, 4, 8, 16, 32, 64, 128, 256}
    assert {s.rows[0][1] + 1 for s in decode} == {16, 512, 1024, 2048}  # a context for each split count
    assert all(q == 1 for s in decode for q, _ in s.rows)
    torch_backend = plan_steps("full", budget=budget, max_num_seqs=seqs, max_model_len=max_len, decode_splits=False)
    assert {s.rows[0][1] + 1 for s in torch_backend if s.kind == "decode"} == {16}  # no splits to warm
    prefill_role = plan_steps("full", budget=budget, max_num_seqs=seqs, max_model_len=max_len, role="prefill")
    assert not any(s.kind in ("decode", "mixed") for s in prefill_role)  # a prefill node never decodes
    minimal = plan_steps("minimal", budget=budget, max_num_seqs=seqs, max_model_len=max_len)
    assert [s.kind for s in minimal] == ["prefill", "decode"]


def test_small_budgets_and_contexts():
    steps = plan_steps("full", budget=8, max_num_seqs=2, max_model_len=6)
    for s in steps:
        assert 1 <= s.num_tokens <= 8 and len(s.rows) <= 2
        assert all(q >= 1 and start + q <= 5 for q, start in s.rows)


def _state(eng):
    bm = eng.block_manager
    return dict(free=bm.num_free_blocks, total=bm.num_total_blocks, hashes=dict(bm.hash_to_block),
                queries=bm.prefix_queries, hits=bm.prefix_hits, requests=eng.num_unfinished_requests,
                waiting=len(eng.scheduler.waiting), running=len(eng.scheduler.running))


def test_full_warmup_leaves_no_trace_and_keeps_greedy_output(make_tiny_model, caplog):
    path = str(make_tiny_model("llama"))
    prompts = random_prompts(6, 49152, lo=2, hi=60, seed=3)
    cold = LLM(path, **KW)
    want = token_ids(cold.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False))

    llm = LLM(path, **KW)
    eng = llm.engine
    before = _state(eng)
    null = [(k[0].clone(), v[0].clone()) for k, v in eng.runner.kv_caches]
    rng = torch.random.get_rng_state()
    with caplog.at_level(logging.INFO, logger="pdserve.engine"):
        report = warm_up(eng, "full")
    assert report.mode == "full" and report.shapes == len(report.steps) + len(report.sampler_paths)
    counts = report.counts()
    assert counts["prefill"] >= 16 and counts["rows"] == 7 and counts["decode"] >= 4 and counts["sampler"] >= 20
    assert any(r.getMessage().startswith("warm-up (full): ") for r in caplog.records)
    assert _state(eng) == before
    assert before["free"] == before["total"] and not before["hashes"]  # every block free, empty prefix cache
    assert all(torch.equal(k[0], k0) and torch.equal(v[0], v0) for (k, v), (k0, v0) in zip(eng.runner.kv_caches, null))
    assert torch.equal(torch.random.get_rng_state(), rng)
    eng.check_invariants()

    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False))
    assert got == want
    # and a seeded random request draws the same stream as on the engine that never warmed up
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    assert (token_ids(llm.generate([{"prompt_token_ids": prompts[0]}], seeded, use_tqdm=False))
            == token_ids(cold.generate([{"prompt_token_ids": prompts[0]}], seeded, use_tqdm=False)))
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_total_blocks


def test_warmup_refuses_a_busy_engine_and_off_does_nothing(make_tiny_model):
    llm = LLM(str(make_tiny_model("llama")), **KW)
    eng = llm.engine
    assert warm_up(eng, "off").shapes == 0
    report = warm_up(eng, "auto")  # CPU: minimal
    assert report.mode == "minimal" and report.counts()["prefill"] == 1
    eng.add_request("busy", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up(eng, "minimal")
    eng.abort_request("busy")


def test_prefill_tile_lists_are_16_byte_aligned():
    """Triton specializes a pointer on 16-byte alignment: aligned lists = one kernel per class."""
    from kernels.paged_prefill_attention import plan_tiles

    rng = random.Random(0)
    for _ in range(200):
        query_lens = [rng.choice([1, 1, 2, 3, 5, 9, 17, 40, 200, 1000]) for _ in range(rng.randint(1, 12))]
        for group in (1, 4, 8):
            for t in plan_tiles(query_lens, group, torch.device("cpu")):
                assert t.tile_seq.data_ptr() % 16 == 0 and t.tile_q.data_ptr() % 16 == 0, (query_lens, group)


@pytest.mark.slow
def test_node_logs_warmup_and_startup(make_tiny_model):
    from tests.services.test_nodes import start_node

    node = start_node("decode", make_tiny_model("llama"), "--warmup", "full")
    try:
        text = "".join(node.stderr)
        assert "warm-up (full): " in text and "SERVING after" in text, text[-2000:]
        load = node.load()
        assert load.free_blocks == load.total_blocks
    finally:
        node.stop()


# ---- CUDA ---------------------------------------------------------------------------------------


def _compiled_kernels() -> int:
    """Compiled variants held by every Triton kernel of kernels/ (its in-memory cache)."""
    import importlib
    import pkgutil

    import kernels
    from triton.runtime.jit import JITFunction

    total = 0
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, JITFunction):
                total += sum(len(entry[0]) for entry in obj.device_caches.values())
    return total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_no_compile_after_full_warmup(make_tiny_model, enforce_eager):
    path = str(make_tiny_model("llama", dtype=torch.bfloat16))
    llm = LLM(path, device="cuda", dtype="bfloat16", num_gpu_blocks=512, max_model_len=512, max_num_seqs=32,
              max_num_batched_tokens=256, enforce_eager=enforce_eager)
    report = warm_up(llm.engine, "full")
    compiled = _compiled_kernels()
    assert compiled > 0 and report.seconds > 0
    rng = random.Random(1)
    for batch in (1, 3, 7, 13, 32):
        prompts = [[rng.randrange(3, 49152) for _ in range(rng.choice([1, 2, 5, 16, 17, 33, 100, 255, 400]))]
                   for _ in range(batch)]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.7]), top_p=rng.choice([1.0, 0.9]),
                                 top_k=rng.choice([0, 20]), logprobs=rng.choice([None, 3]),
                                 max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert _compiled_kernels() == compiled  # the workload found every kernel compiled
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
