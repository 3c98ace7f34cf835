"""Nodes trust the router's resolved parameters (issue #10): `from_resolved` checks nothing, so the
engine must be total over every value a `ResolvedParams` field can hold. A value the router would
refuse may change that request's own output; it must never raise inside a batched step, lose the
node, or change what a bystander in the same batch generates."""
from __future__ import annotations

import math

import pytest

from engine import LLM, SamplingParams
from engine import sampling_proto as sp
from protos.pdserve.v1 import node_pb2
from tests.engine.helpers import random_prompts

VOCAB = 49152
U32 = 2**32 - 1
NAN, INF = float("nan"), float("inf")

# What a client that reaches a node port directly could send; each is refused at the router.
WILD = {
    "all unset (top_p 0, repetition_penalty 0)": node_pb2.ResolvedParams(),
    "NaN sampling": node_pb2.ResolvedParams(temperature=NAN, top_p=NAN, min_p=NAN, top_k=-7, seed=2**64 - 1,
                                            repetition_penalty=1.0),
    "infinite and negative": node_pb2.ResolvedParams(temperature=INF, top_p=5.0, min_p=-1.0, top_k=2**31 - 1,
                                                     repetition_penalty=-3.0, presence_penalty=NAN,
                                                     frequency_penalty=INF),
    "negative temperature": node_pb2.ResolvedParams(temperature=-2.0, top_p=1.0, repetition_penalty=1.0),
    "ids past the vocabulary": node_pb2.ResolvedParams(
        temperature=1.0, top_p=1.0, repetition_penalty=1.0, logit_bias={VOCAB + 5: 1e30, U32: -INF, 0: INF, 3: NAN},
        stop_token_ids=[VOCAB, U32], min_tokens=U32, max_tokens=U32),
    "every logprob": node_pb2.ResolvedParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0, logprobs=U32,
                                             prompt_logprobs=U32, max_tokens=3),
    "odd stops": node_pb2.ResolvedParams(temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                                         stop=["", "a" * 5000] + [f"s{i}" for i in range(200)], max_tokens=5),
}


@pytest.fixture(scope="module")
def llm(make_tiny_model):
    return LLM(str(make_tiny_model("llama")), num_gpu_blocks=256, max_model_len=96)


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Adds every request to one batch and steps until all finish: request id -> [ids, reason]."""
    out = {rid: [[], None] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, params=params, prompt_token_ids=prompt)
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        for step in engine.step():
            out[step.request_id][0] += step.new_token_ids
            if step.finished:
                out[step.request_id][1] = step.finish_reason
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
    return out


def test_resolved_params_are_taken_as_sent():
    back, _ = sp.from_resolved(WILD["NaN sampling"])
    assert math.isnan(back.temperature) and back.top_k == 0 and back.seed == 2**64 - 1
    back, _ = sp.from_resolved(WILD["ids past the vocabulary"])
    assert back.max_tokens == U32 and VOCAB + 5 in back.logit_bias and back.stop_token_ids == [VOCAB, U32]
    with pytest.raises(ValueError):  # the same values are refused where a request enters
        SamplingParams(temperature=NAN)


def test_any_resolved_value_leaves_a_bystander_untouched(llm):
    engine = llm.engine
    prompts = random_prompts(len(WILD) + 1, VOCAB, lo=5, hi=30, seed=41)
    bystander = (prompts[0], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    alone = _run(engine, {"alone": bystander})["alone"]
    batch = {"bystander": bystander}
    for i, (name, msg) in enumerate(WILD.items()):
        batch[name] = (prompts[i + 1], sp.from_resolved(msg)[0])
    got = _run(engine, batch)
    assert got["bystander"] == alone and len(alone[0]) == 12
    for name in WILD:
        ids, reason = got[name]
        assert reason in ("length", "stop", "eos"), (name, reason)
        assert all(0 <= t < VOCAB for t in ids), name
        assert len(prompts[list(WILD).index(name) + 1]) + len(ids) <= 96, name  # max_tokens capped by the context
    assert got["ids past the vocabulary"][1] == "length"  # U32 max_tokens: until the context is full
    assert got["odd stops"][1] == "stop" and got["odd stops"][0] == got["odd stops"][0][:1]  # "" matches at once


def test_the_offline_api_still_refuses_what_the_router_refuses(llm):
    with pytest.raises(ValueError, match="exceeds the max model length 96"):
        llm.generate([{"prompt_token_ids": [5] * 10}], SamplingParams(max_tokens=90), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias keys must be < vocab size"):
        llm.generate([{"prompt_token_ids": [5] * 10}], SamplingParams(logit_bias={VOCAB: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
