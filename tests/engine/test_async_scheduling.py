"""Async scheduling (step N+1 queued before step N's tokens are read) gives exactly the output of
synchronous stepping. On CPU the device work is synchronous, but every piece of the bookkeeping
runs: placeholder input tokens read from the previous step's output, late finishes (eos, stop
strings, stop ids) discarding the queued step's row, preemption with a token in flight, prefix
cache registration after the fact, penalties forcing a wait."""
from __future__ import annotations

import dataclasses
import random

import pytest

from engine import LLM, SamplingParams
from engine.model_runner import ModelRunner
from tests.engine.helpers import greedy, random_prompts, token_ids


def _run(path, prompts, params, **kw):
    llm = LLM(str(path), **kw)
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    eng = llm.engine
    eng.check_invariants()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_total_blocks
    assert not eng.has_unfinished_requests()
    return out, eng


def _mixed_params(n: int, seed: int) -> list[SamplingParams]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(greedy(rng.randint(1, 30)))
        elif kind == 1:  # eos allowed: the tiny model's eos (2) may come early or not at all
            out.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(5, 30), stop_token_ids=[17, 23, 99]))
        elif kind == 2:
            out.append(SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_tokens=rng.randint(1, 30),
                                      ignore_eos=True, logprobs=2))
        elif kind == 3:
            out.append(SamplingParams(temperature=0.7, seed=i, max_tokens=20, ignore_eos=True, min_tokens=5,
                                      stop=["a", "e"]))
        else:  # penalties need the token values on the host: that step waits for the one before
            out.append(SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True, repetition_penalty=1.3,
                                      frequency_penalty=0.5))
    return out


@pytest.mark.parametrize("arch", ["llama", "smollm2"])
def test_async_equals_sync(make_tiny_model, arch):
    path = make_tiny_model(arch)
    prompts = random_prompts(30, 49152, seed=4)
    params = _mixed_params(30, seed=5)
    sync, _ = _run(path, prompts, params, num_gpu_blocks=512, async_scheduling=False)
    asyn, eng = _run(path, prompts, params, num_gpu_blocks=512, async_scheduling=True)
    assert eng._async
    for a, b in zip(sync, asyn):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        assert a.outputs[0].stop_reason == b.outputs[0].stop_reason
        assert (a.outputs[0].logprobs is None) == (b.outputs[0].logprobs is None)
    assert any(o.outputs[0].finish_reason == "stop" for o in asyn)  # late finishes were exercised


def test_async_with_preemption_chunking_and_prefix_hits(make_tiny_model):
    path = make_tiny_model("llama")
    base = random_prompts(10, 49152, lo=30, hi=60, seed=7)
    prompts = base + [p[:33] + [5, 6] for p in base]  # prefix hits after registration
    kw = dict(num_gpu_blocks=22, max_num_batched_tokens=48, max_num_seqs=8)  # tiny cache: preemptions
    sync, _ = _run(path, prompts, greedy(24), async_scheduling=False, **kw)
    asyn, eng = _run(path, prompts, greedy(24), async_scheduling=True, **kw)
    assert token_ids(asyn) == token_ids(sync)
    assert eng.scheduler.num_preemptions > 0
    assert eng.block_manager.prefix_hits > 0


def test_async_n_greater_than_one_and_abort(make_tiny_model):
    path = make_tiny_model("llama")
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=12, ignore_eos=True)
    prompts = random_prompts(4, 49152, seed=8)
    sync, _ = _run(path, prompts, params, num_gpu_blocks=256, async_scheduling=False)
    asyn, _ = _run(path, prompts, params, num_gpu_blocks=256, async_scheduling=True)
    assert [[c.token_ids for c in o.outputs] for o in asyn] == [[c.token_ids for c in o.outputs] for o in sync]

    llm = LLM(str(path), num_gpu_blocks=256, async_scheduling=True)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), None, greedy(50), prompt_token_ids=p)
    for _ in range(4):
        eng.step()
    assert eng.abort_request("1")
    got: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert "1" not in got or len(got["1"]) < 50
    assert all(len(got[k]) + 3 >= 50 for k in ("0", "2", "3"))
    eng.check_invariants()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_total_blocks


def test_the_runner_reads_nothing_from_requests(make_tiny_model, monkeypatch):
    """The SchedulerOutput is the model runner's whole input: with every chunk's request hidden from
    it, async steps (placeholder tokens, late finishes, penalties waiting, prompt logprobs) give
    the output of synchronous ones."""
    path = make_tiny_model("llama")
    prompts = random_prompts(12, 49152, seed=9)
    params = _mixed_params(10, seed=10) + [SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2)] * 2
    sync, _ = _run(path, prompts, params, num_gpu_blocks=512, async_scheduling=False)
    launch = ModelRunner.launch

    def without_requests(self, out, rows, prev=None, to_host=True):
        hidden = tuple(dataclasses.replace(c, request=None) for c in out.chunks)
        return launch(self, dataclasses.replace(out, chunks=hidden), rows, prev, to_host)

    monkeypatch.setattr(ModelRunner, "launch", without_requests)
    asyn, eng = _run(path, prompts, params, num_gpu_blocks=512, async_scheduling=True)
    assert eng._async
    assert token_ids(asyn) == token_ids(sync)
    assert [o.outputs[0].finish_reason for o in asyn] == [o.outputs[0].finish_reason for o in sync]
    assert asyn[-1].prompt_logprobs is not None and asyn[-1].prompt_logprobs == sync[-1].prompt_logprobs
