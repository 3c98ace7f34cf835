"""Colocated serving behind the router (`pdserve serve --num-prefill 0`): the decode nodes run their
own prompts (chunked prefill in their batch, no reservation, no KV transfer). Same greedy output as
the offline engine and as the disaggregated stack; a dead decode node before the first token is
retried on the other one."""
from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from protos.pdserve.v1 import generation_pb2 as g
from tests.services.helpers import ENGINE_KW, assert_idle, greedy_request, prompts, stream_greedy
from tests.services.stack import start_stack

FR = g.FinishReason
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def reference(tiny):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(str(tiny), **ENGINE_KW)
    texts = prompts(llm.get_tokenizer())
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return texts, [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs]


@pytest.fixture(scope="module")
def stack(tiny):
    with start_stack(tiny, num_prefill=0, num_decode=2) as s:
        yield s


@pytest.mark.timeout(240)
def test_colocated_greedy_matches_offline_engine(stack, reference):
    texts, expected = reference
    stub = stack.stub()
    with ThreadPoolExecutor(16) as pool:
        unary = list(pool.map(lambda t: stub.Generate(greedy_request(t, MAX_TOKENS), timeout=60), texts))
        streamed = list(pool.map(lambda t: stream_greedy(stub, t, MAX_TOKENS), texts))
    for (ids, text), resp, (s_ids, s_text, last) in zip(expected, unary, streamed):
        c = resp.completions[0]
        assert list(c.token_ids) == ids and c.text == text
        assert s_ids == ids and s_text == text and last.finish_reason == c.finish_reason
        t = c.timings
        assert t.prefill_node == t.decode_node and t.decode_node.startswith("decode-")
        assert t.kv_transfer_bytes == 0 and t.ttft_ms > 0
        assert c.prompt_tokens > 0 and c.completion_tokens == len(ids)
    assert {r.completions[0].timings.decode_node for r in unary} == {"decode-0", "decode-1"}
    assert_idle(stub)


@pytest.mark.timeout(240)
def test_colocated_prefix_cache_and_decode_death_retry(stack, reference):
    texts, expected = reference
    stub = stack.stub()
    long_prompt = " ".join(texts[:3])
    first = stub.Generate(greedy_request(long_prompt, 4), timeout=60).completions[0]
    again = stub.Generate(greedy_request(long_prompt, 4), timeout=60).completions[0]
    assert list(again.token_ids) == list(first.token_ids)
    if again.timings.decode_node == first.timings.decode_node:
        assert again.cached_tokens > 0  # the same node's prefix cache served the prompt
    stack.kill("decode-0", signal.SIGKILL)
    for text, (ids, out_text) in zip(texts, expected):  # every request lands on the survivor
        c = stub.Generate(greedy_request(text, MAX_TOKENS), timeout=60).completions[0]
        assert list(c.token_ids) == ids and c.text == out_text and c.timings.decode_node == "decode-1"
    assert_idle(stub)
