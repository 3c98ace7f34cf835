"""Same greedy output whatever the engine does underneath: chunking, preemption, prefix-cache
hits, prefill/decode split, batching. Tiny random Llama on CPU."""
from __future__ import annotations

import pytest

from engine import LLM
from tests.engine.helpers import greedy, random_prompts, token_ids

NEW = 24


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return str(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(12, 49152, lo=1, hi=90, seed=7)


@pytest.fixture(scope="module")
def baseline(model_dir, prompts):
    llm = LLM(model_dir, num_gpu_blocks=512, enable_prefix_caching=False)
    return token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW), use_tqdm=False))


def _run(model_dir, prompts, **kwargs):
    llm = LLM(model_dir, **kwargs)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW), use_tqdm=False)
    llm.engine.check_invariants()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks, "KV blocks leaked"
    return token_ids(out), llm


@pytest.mark.parametrize("chunk", [7, 13, 33])
def test_chunked_prefill_matches_unchunked(model_dir, prompts, baseline, chunk):
    out, llm = _run(model_dir, prompts, num_gpu_blocks=512, max_num_batched_tokens=chunk,
                    enable_prefix_caching=False)
    assert out == baseline


def test_preemption_matches_no_preemption(model_dir, prompts, baseline):
    # 12 requests of up to 114 tokens need ~90 blocks of 16; 14 blocks force constant preemption.
    out, llm = _run(model_dir, prompts, num_gpu_blocks=15, enable_prefix_caching=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == baseline


def test_batched_matches_alone(model_dir, prompts, baseline):
    llm = LLM(model_dir, num_gpu_blocks=512, enable_prefix_caching=False)
    alone = [token_ids(llm.generate([{"prompt_token_ids": p}], greedy(NEW), use_tqdm=False))[0] for p in prompts]
    assert alone == baseline


def test_max_num_seqs_one_matches(model_dir, prompts, baseline):
    out, _ = _run(model_dir, prompts, num_gpu_blocks=512, max_num_seqs=1, enable_prefix_caching=False)
    assert out == baseline


def test_prefix_cache_hit_matches_miss(model_dir):
    shared = random_prompts(1, 49152, lo=50, hi=50, seed=3)[0]  # 3 full blocks + 2 tokens
    tails = random_prompts(4, 49152, lo=3, hi=9, seed=4)
    prompts = [shared + t for t in tails]
    miss, _ = _run(model_dir, prompts, num_gpu_blocks=128, enable_prefix_caching=False)

    llm = LLM(model_dir, num_gpu_blocks=128, enable_prefix_caching=True)
    first = llm.generate([{"prompt_token_ids": prompts[0]}], greedy(NEW), use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    bm = llm.engine.block_manager
    cached_ids = [bm.hash_to_block[b.hash] for b in bm.blocks if b.hash != -1]
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], greedy(NEW), use_tqdm=False)
    assert [r.num_cached_tokens for r in rest] == [48, 48, 48]
    assert token_ids(first + rest) == miss
    # The three shared blocks kept their ids and their hashes across the hits.
    prefix_blocks = llm.engine.block_manager.find_cached_prefix(shared + [0])
    assert len(prefix_blocks) == 3 and set(prefix_blocks) <= set(cached_ids)
    assert all(bm.blocks[b].ref_count == 0 for b in prefix_blocks)  # free but still cached


def test_prefix_hit_takes_exact_blocks_and_refcounts(model_dir):
    llm = LLM(model_dir, num_gpu_blocks=64, enable_prefix_caching=True)
    eng = llm.engine
    base = random_prompts(1, 49152, lo=40, hi=40, seed=11)[0]  # 2 full blocks + 8 tokens
    llm.generate([{"prompt_token_ids": base}], greedy(2), use_tqdm=False)
    bm = eng.block_manager
    expected = bm.find_cached_prefix(base + [5])
    assert len(expected) == 2
    # Admit two requests sharing the prefix and stop right after scheduling: they hold the same blocks.
    eng.add_request("a", prompt_token_ids=base + [7, 8, 9], params=greedy(4))
    eng.add_request("b", prompt_token_ids=base + [10, 11], params=greedy(4))
    eng.step()
    reqs = {r.client_id: r for r in eng.scheduler.running}
    assert reqs["a"].block_table[:2] == expected and reqs["b"].block_table[:2] == expected
    assert [bm.blocks[b].ref_count for b in expected] == [2, 2]
    assert reqs["a"].num_cached_tokens == 32 and reqs["b"].num_cached_tokens == 32
    eng.abort_request("a")
    assert [bm.blocks[b].ref_count for b in expected] == [1, 1]
    eng.abort_request("b")
    assert bm.num_free_blocks == bm.num_total_blocks
    eng.check_invariants()


def test_prefill_export_decode_import_matches_both(model_dir, prompts, baseline):
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine

    pre = LLMEngine(EngineArgs(model=model_dir, role="prefill", num_gpu_blocks=256))
    dec = LLMEngine(EngineArgs(model=model_dir, role="decode", num_gpu_blocks=256))
    params = greedy(NEW)
    for i, p in enumerate(prompts):
        pre.add_request(str(i), prompt_token_ids=p, params=params)
    firsts = {}
    while pre.has_unfinished_requests():
        for out in pre.step():
            assert out.finished and out.finish_reason == "prefilled"
            firsts[out.request_id] = out.new_token_ids[0]
    assert pre.load()["num_prefilled_held"] == len(prompts)
    for rid, first in firsts.items():
        kv = pre.export_kv(rid)
        assert kv.first_token_id == first and kv.num_tokens == len(prompts[int(rid)])
        dec.import_request(rid, kv.prompt_token_ids, first, params, kv.k, kv.v)
    assert pre.block_manager.num_free_blocks == pre.block_manager.num_total_blocks
    got = {rid: [first] for rid, first in firsts.items()}
    while dec.has_unfinished_requests():
        for out in dec.step():
            got[out.request_id].extend(out.new_token_ids)
    assert [got[str(i)] for i in range(len(prompts))] == baseline
    assert dec.block_manager.num_free_blocks == dec.block_manager.num_total_blocks
    dec.check_invariants()


def test_import_rejects_wrong_kv_shape(model_dir):
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine
    import torch

    dec = LLMEngine(EngineArgs(model=model_dir, role="decode", num_gpu_blocks=32))
    s = dec.shape
    bad = torch.zeros(s.num_layers, 1, 16, s.num_kv_heads, s.head_dim + 1)
    free = dec.block_manager.num_free_blocks
    with pytest.raises(ValueError, match="does not match"):
        dec.import_request("x", [1, 2, 3], 4, greedy(3), bad, bad)
    assert dec.block_manager.num_free_blocks == free
    assert not dec.has_unfinished_requests()


def test_priority_orders_admission(model_dir):
    llm = LLM(model_dir, num_gpu_blocks=64, max_num_seqs=1)
    eng = llm.engine
    eng.add_request("low", prompt_token_ids=[5, 6, 7], params=greedy(2), priority=5)
    eng.add_request("high", prompt_token_ids=[8, 9, 10], params=greedy(2), priority=-1)
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == ["high", "low"]


def test_prefill_text_and_decode_text_join_to_the_single_process_text(model_dir, prompts):
    """The text a node streams (its `text_delta`s, sent to the router as they are): the prefill
    node's first token plus the importing decode node's deltas equal one engine's text (a stop
    string that never matches makes both hold text back)."""
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine

    params = greedy(NEW, stop=["@@never@@"])
    both = LLM(model_dir, num_gpu_blocks=512)
    expected = [o.outputs[0].text for o in both.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
    pre = LLMEngine(EngineArgs(model=model_dir, role="prefill", num_gpu_blocks=256))
    dec = LLMEngine(EngineArgs(model=model_dir, role="decode", num_gpu_blocks=256))
    text = {}
    for i, p in enumerate(prompts):
        pre.add_request(str(i), prompt_token_ids=p, params=params)
        out, = pre.step()
        text[out.request_id] = out.text_delta
        kv = pre.export_kv(out.request_id)
        dec.import_request(out.request_id, kv.prompt_token_ids, kv.first_token_id, params, kv.k, kv.v)
    while dec.has_unfinished_requests():
        for out in dec.step():
            text[out.request_id] += out.text_delta
    assert [text[str(i)] for i in range(len(prompts))] == expected
