"""Prompt logprobs in the in-process engine (`SamplingParams.prompt_logprobs`, vLLM's
`RequestOutput.prompt_logprobs`): equal to HF's log-softmax on the same weights (fp32, CPU) for
prompts shorter and longer than the prefill chunk, batched, with async scheduling, through
preemptions, and with prefix caching on and a warm cache (the prompt is computed again, never read
from the cache). Also the per-step token counts behind the iteration_tokens metric."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine.helpers import check_prompt_logprobs, hf_model, hf_prompt_logprobs, random_prompts

CHUNK = 32  # max_num_batched_tokens: the 70- and 100-token prompts prefill in several chunks


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def hf(tiny):
    return hf_model(tiny)


def entries(out, num_top: int):
    """RequestOutput.prompt_logprobs -> check_prompt_logprobs' (id, logprob, rank, top) tuples."""
    assert out.prompt_logprobs[0] is None
    rows = []
    for entry in out.prompt_logprobs[1:]:
        (token_id, lp), *rest = entry.items()
        top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:num_top]
        assert all(c.decoded_token is not None for c in entry.values())
        rows.append((token_id, lp.logprob, lp.rank, [(t, c.logprob) for t, c in top]))
    return rows


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_match_hf_chunked_and_batched(tiny, hf, async_scheduling):
    prompts = random_prompts(4, 49152, lo=2, hi=20, seed=3) + random_prompts(2, 49152, lo=70, hi=100, seed=4)
    prompts[0] = prompts[0][:1]  # one token: no prompt logprob at all
    llm = LLM(str(tiny), num_gpu_blocks=128, max_num_seqs=8, max_num_batched_tokens=CHUNK,
              async_scheduling=async_scheduling)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(4, prompt_logprobs=3), use_tqdm=False)
    assert any(len(p) > CHUNK for p in prompts)
    for ids, out in zip(prompts, outs):
        assert len(out.prompt_logprobs) == len(ids)
        check_prompt_logprobs(entries(out, 3), ids, hf_prompt_logprobs(hf, ids), 3)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(4), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outs]
    assert all(o.prompt_logprobs is None for o in plain)
    llm.engine.check_invariants()


def test_warm_prefix_cache_is_bypassed(tiny, hf):
    ids = random_prompts(1, 49152, lo=80, hi=80, seed=7)[0]
    llm = LLM(str(tiny), num_gpu_blocks=128, max_num_batched_tokens=CHUNK, enable_prefix_caching=True)
    warm = llm.generate([{"prompt_token_ids": ids}], greedy(3), use_tqdm=False)[0]
    again = llm.generate([{"prompt_token_ids": ids}], greedy(3), use_tqdm=False)[0]
    assert again.num_cached_tokens == 64  # the cache is warm: 4 full blocks of 16
    out = llm.generate([{"prompt_token_ids": ids}], greedy(3, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # computed, not read: a cached block has no logits
    check_prompt_logprobs(entries(out, 2), ids, hf_prompt_logprobs(hf, ids), 2)
    assert out.outputs[0].token_ids == warm.outputs[0].token_ids
    after = llm.generate([{"prompt_token_ids": ids}], greedy(3), use_tqdm=False)[0]
    assert after.num_cached_tokens == 64  # and the cache still serves requests without prompt logprobs
    llm.engine.check_invariants()


def test_zero_top_and_n_samples(tiny, hf):
    ids = random_prompts(1, 49152, lo=20, hi=20, seed=9)[0]
    llm = LLM(str(tiny), num_gpu_blocks=64)
    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=4, prompt_logprobs=0),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3 and len(out.prompt_logprobs) == len(ids)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # 0: the prompt token's own only
    check_prompt_logprobs(entries(out, 0), ids, hf_prompt_logprobs(hf, ids), 0)


def test_through_preemptions(tiny, hf):
    """A KV cache of 12 blocks for 4 requests of 40 + 40 tokens: requests are preempted and
    recomputed; every prompt logprob is still there once, and right."""
    prompts = random_prompts(4, 49152, lo=40, hi=40, seed=11)
    llm = LLM(str(tiny), num_gpu_blocks=12, max_num_seqs=4, max_num_batched_tokens=CHUNK)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(40, prompt_logprobs=1), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for ids, out in zip(prompts, outs):
        check_prompt_logprobs(entries(out, 1), ids, hf_prompt_logprobs(hf, ids), 1)
    llm.engine.check_invariants()


def test_step_tokens_count_every_step(tiny):
    """iteration_tokens: one count per step that ran; a request of P prompt and G generated tokens
    computes P + G - 1 tokens (the last sampled token is never fed back)."""
    prompts = random_prompts(3, 49152, lo=10, hi=50, seed=13)
    llm = LLM(str(tiny), num_gpu_blocks=64, max_num_batched_tokens=CHUNK, enable_prefix_caching=False)
    engine = llm.engine
    engine.take_step_tokens()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", params=greedy(6), prompt_token_ids=p)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    counts = engine.take_step_tokens()
    assert len(counts) == steps and all(0 < c <= CHUNK for c in counts)
    assert sum(counts) == sum(len(p) + 6 - 1 for p in prompts)
    assert engine.take_step_tokens() == []


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_prompt_logprobs_validated(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)


@pytest.mark.slow
def test_tensor_parallel_ranks_compute_the_same_rows(tiny, hf):
    """TP=2 (gloo on CPU): every rank computes the prompt-logprob rows' logits with rank 0 (the
    vocab-parallel LM head gathers them), chunked prefill included."""
    prompts = random_prompts(2, 49152, lo=40, hi=60, seed=17)
    with LLM(str(tiny), tensor_parallel_size=2, num_gpu_blocks=64, max_num_batched_tokens=CHUNK) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(3, prompt_logprobs=2), use_tqdm=False)
    for ids, out in zip(prompts, outs):
        check_prompt_logprobs(entries(out, 2), ids, hf_prompt_logprobs(hf, ids), 2)


def test_a_step_computes_at_most_its_prompt_logits_room(tiny, hf, monkeypatch):
    """Full logits of prompt positions are bounded per step (scheduler.PROMPT_LOGITS_PER_STEP, which
    the KV sizing profile measures), whatever the token budget: requests asking for prompt logprobs
    share that room and prefill in chunks of it; a request without them is not held back."""
    from engine import scheduler as sched

    room = 16
    monkeypatch.setattr(sched, "PROMPT_LOGITS_PER_STEP", room)
    llm = LLM(str(tiny), num_gpu_blocks=128, max_num_seqs=8, max_num_batched_tokens=256)
    engine = llm.engine
    schedule, steps = engine.scheduler.schedule, []

    def recording():
        out = schedule()
        steps.append([(c.request.client_id, len(c.token_ids), c.prompt_logits[1]) for c in out.chunks])
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", recording)
    asking = random_prompts(2, 49152, lo=40, hi=60, seed=17)
    plain = random_prompts(1, 49152, lo=70, hi=70, seed=18)[0]
    outs = llm.generate([{"prompt_token_ids": p} for p in asking] + [{"prompt_token_ids": plain}],
                        [greedy(3, prompt_logprobs=2)] * 2 + [greedy(3)], use_tqdm=False)
    ids = [o.request_id for o in outs]
    for step in steps:
        assert sum(n for rid, n, _ in step if rid in ids[:2] and n > 1) <= room  # prompt chunks of the askers
        assert sum(count for *_, count in step) <= room
    assert any((ids[2], 70, 0) in step for step in steps)  # the plain prompt in one chunk
    assert max(n for step in steps for rid, n, _ in step if rid == ids[0]) <= room
    for p, out in zip(asking, outs):
        check_prompt_logprobs(entries(out, 2), p, hf_prompt_logprobs(hf, p), 2)
    engine.check_invariants()
