"""Resuming a completion from tokens another node generated (`add_request(output_token_ids=...)`,
the router's mid-stream failover): the continuation equals the undisturbed run, for greedy,
seeded sampling with penalties, and stop strings; the resumed text is not emitted again."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.engine.helpers import random_prompts

NEW = 20


@pytest.fixture(scope="module")
def llm(make_tiny_model):
    return LLM(str(make_tiny_model("llama")), num_gpu_blocks=256, dtype="float32")


def _run(llm, prompt, params, output_token_ids=None):
    engine = llm.engine
    engine.add_request("r", params=params, prompt_token_ids=prompt, output_token_ids=output_token_ids)
    tokens, text, finish = [], "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.text_delta
            finish = out.finish_reason or finish
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_total_blocks
    return tokens, text, finish


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=11, top_p=0.9, max_tokens=NEW, ignore_eos=True,
                   presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
], ids=["greedy", "seeded-penalties"])
@pytest.mark.parametrize("cut", [1, 7, NEW - 1])
def test_resumed_continuation_equals_undisturbed(llm, params, cut):
    prompt = random_prompts(1, llm.engine.shape.vocab_size, lo=5, hi=40, seed=cut)[0]
    tokens, text, finish = _run(llm, prompt, params)
    rest, rest_text, rest_finish = _run(llm, prompt, params, output_token_ids=tokens[:cut])
    assert rest == tokens[cut:] and rest_finish == finish == "length"
    head_text = llm.get_tokenizer().decode(tokens[:cut])
    assert text.startswith(head_text) or len(head_text) == 0
    assert rest_text == text[len(text) - len(rest_text):]  # only the continuation's text


def test_resume_refuses_what_cannot_continue(llm):
    prompt = [5, 6, 7]
    with pytest.raises(ValueError, match="leave nothing to generate"):
        llm.engine.add_request("x", params=SamplingParams(max_tokens=3), prompt_token_ids=prompt,
                               output_token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="resumed output token ids"):
        llm.engine.add_request("y", params=SamplingParams(max_tokens=8), prompt_token_ids=prompt,
                               output_token_ids=[10**9])
    with pytest.raises(ValueError, match="one sequence"):
        llm.engine.add_request("z", params=SamplingParams(max_tokens=8, n=2), prompt_token_ids=prompt,
                               output_token_ids=[1])
    assert not llm.engine.has_unfinished_requests()
