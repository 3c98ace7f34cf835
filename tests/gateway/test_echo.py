"""Completions `echo` and prompt logprobs on the shared stack (router + prefill + decode + gateway,
tiny random Llama, fp32 on CPU), against HF's log-softmax on the same weights:
- lm-eval-harness's loglikelihood request (OpenAI SDK: echo, logprobs 1, max_tokens 0);
- echo with generated tokens after the prompt; vLLM's `prompt_logprobs` on completions and chat;
- gRPC `prompt_logprobs` through the router and the prefill + decode pair, unary and streamed,
  with n > 1 and a warm prefix cache on the prefill node;
- the same, streamed (echo and prompt_logprobs in each choice's first chunk);
- what is not built is refused with 400 naming the field."""
from __future__ import annotations

import openai
import pytest

from protos.pdserve.v1 import generation_pb2 as pb
from tests.engine.helpers import check_prompt_logprobs, hf_model, hf_prompt_logprobs

pytestmark = pytest.mark.timeout(300)
ATOL = 1e-3


@pytest.fixture(scope="module")
def hf(make_tiny_model):
    return hf_model(make_tiny_model("llama"))


@pytest.fixture(scope="module")
def tok(default_tokenizer):
    return default_tokenizer


def vllm_entries(prompt_logprobs, ids, num_top):
    """vLLM's JSON prompt_logprobs -> check_prompt_logprobs' (id, logprob, rank, top) tuples."""
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    rows = []
    for i, position in enumerate(prompt_logprobs[1:], 1):
        token = position[str(ids[i])]
        top = sorted(((int(t), c) for t, c in position.items()), key=lambda kv: kv[1]["rank"])[:num_top]
        assert all(isinstance(c["decoded_token"], str) for c in position.values())
        rows.append((ids[i], token["logprob"], token["rank"], [(t, c["logprob"]) for t, c in top]))
    return rows


def proto_entries(entries):
    return [(e.token_id, e.logprob, e.rank, [(t.token_id, t.logprob) for t in e.top]) for e in entries]


def test_loglikelihood_request_as_lm_eval_sends_it(stack_sdk, stack_model, tok, hf):
    context, continuation = "The capital of France is", " Paris, of course."
    ctx = tok.encode(context)
    ids = tok.encode(context + continuation)
    out = stack_sdk.completions.create(model=stack_model, prompt=[ids], echo=True, logprobs=1, max_tokens=0,
                                       temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == tok.decode(ids) and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = hf_prompt_logprobs(hf, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < ATOL, i
        (best,) = lp.top_logprobs[i].values()
        assert abs(best - ref[i - 1].max().item()) < ATOL, i
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    # what lm-eval-harness computes from it: the continuation's loglikelihood and greediness
    ctxlen = len(ctx)
    ll = sum(lp.token_logprobs[ctxlen:])
    want = sum(ref[i - 1, ids[i]].item() for i in range(ctxlen, len(ids)))
    assert abs(ll - want) < ATOL * len(ids)
    greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[ctxlen:], lp.top_logprobs[ctxlen:]))
    assert greedy == all(ref[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))


def test_echo_with_generated_tokens(stack_sdk, stack_model, tok, hf):
    prompt = "Once upon a time there was"
    ids = tok.encode(prompt)
    kw = dict(model=stack_model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    plain = stack_sdk.completions.create(**kw).choices[0]
    echoed = stack_sdk.completions.create(echo=True, **kw).choices[0]
    assert echoed.text == prompt + plain.text
    lp = echoed.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.tokens[len(ids):] == plain.logprobs.tokens
    # the same tokens (the plain request may read a cached prefix: equal up to float rounding)
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=ATOL)
    assert lp.text_offset[len(ids):] == [len(prompt) + o for o in plain.logprobs.text_offset]
    ref = hf_prompt_logprobs(hf, ids)
    assert lp.token_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < ATOL
        assert len(lp.top_logprobs[i]) == 2
    without = stack_sdk.completions.create(echo=True, **{**kw, "logprobs": None}).choices[0]
    assert without.text == echoed.text and without.logprobs is None


def test_vllm_prompt_logprobs_field(stack_sdk, stack_model, tok, hf):
    ids = tok.encode("A lazy dog sleeps under the old oak tree while the cat watches")
    out = stack_sdk.completions.create(model=stack_model, prompt=ids, max_tokens=2, n=2, temperature=0.7, seed=3,
                                       extra_body={"prompt_logprobs": 2})
    ref = hf_prompt_logprobs(hf, ids)
    first = out.choices[0].model_extra["prompt_logprobs"]
    assert out.choices[1].model_extra["prompt_logprobs"] == first  # every choice carries its prompt's
    check_prompt_logprobs(vllm_entries(first, ids, 2), ids, ref, 2)
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_prompt_logprobs(stack_sdk, stack_model, stack_http, hf):
    messages = [{"role": "user", "content": "Name a color."}]
    ids = stack_http.post("/tokenize", json={"model": stack_model, "messages": messages}).json()["tokens"]
    out = stack_sdk.chat.completions.create(model=stack_model, messages=messages, max_tokens=2,
                                            extra_body={"prompt_logprobs": 1})
    check_prompt_logprobs(vllm_entries(out.model_extra["prompt_logprobs"], ids, 1), ids, hf_prompt_logprobs(hf, ids), 1)


def _streamed(stack_sdk, **kw) -> dict:
    """A streamed completion joined back per choice: text, logprobs lists, finish, prompt_logprobs."""
    choices: dict = {}
    usage = None
    for chunk in stack_sdk.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"text": "", "logprobs": None, "finish": None, "prompt_logprobs": None})
            assert got["finish"] is None, "a chunk after the choice finished"
            got["text"] += c.text
            got["finish"] = c.finish_reason
            if (c.model_extra or {}).get("prompt_logprobs") is not None:
                assert got["prompt_logprobs"] is None, "prompt_logprobs twice"
                got["prompt_logprobs"] = c.model_extra["prompt_logprobs"]
            if c.logprobs is not None:
                lp = got["logprobs"] = got["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                          "text_offset": []}
                for key in lp:
                    lp[key] += getattr(c.logprobs, key)
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def _logprobs_dict(lp) -> dict:
    return {key: getattr(lp, key) for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _same_logprobs(streamed: dict, unary: dict):
    assert streamed["tokens"] == unary["tokens"] and streamed["text_offset"] == unary["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(unary["token_logprobs"], abs=ATOL)
    assert [None if t is None else sorted(t) for t in streamed["top_logprobs"]] == \
        [None if t is None else sorted(t) for t in unary["top_logprobs"]]


def test_streamed_echo_equals_the_unary_one(stack_sdk, stack_model, tok):
    """echo with stream: the prompt (text, and its tokens' logprobs) comes in each choice's first
    chunk; joined, the stream equals the unary response: lm-eval's loglikelihood request
    (max_tokens 0), echo with generated tokens and logprobs, and echo without logprobs at n = 2."""
    ids = tok.encode("The capital of France is Paris, of course.")
    cases = [dict(prompt=[ids], echo=True, logprobs=1, max_tokens=0),
             dict(prompt="Once upon a time there was", echo=True, logprobs=2, max_tokens=3,
                  extra_body={"ignore_eos": True}),
             dict(prompt=["A red", "The sea"], echo=True, max_tokens=2, n=2, extra_body={"ignore_eos": True})]
    for kw in cases:
        kw = dict(model=stack_model, temperature=0, **kw)
        unary = stack_sdk.completions.create(**kw)
        streamed = _streamed(stack_sdk, **kw)
        assert len(streamed["choices"]) == len(unary.choices), kw
        for got, want in zip(streamed["choices"], unary.choices):
            assert got["text"] == want.text and got["finish"] == want.finish_reason, kw
            if want.logprobs is None:
                assert got["logprobs"] is None
            else:
                _same_logprobs(got["logprobs"], _logprobs_dict(want.logprobs))
        assert streamed["usage"].completion_tokens == unary.usage.completion_tokens, kw
        assert streamed["usage"].prompt_tokens == unary.usage.prompt_tokens, kw
    assert unary.choices[0].text.startswith("A red") and unary.choices[2].text.startswith("The sea")


def test_streamed_prompt_logprobs(stack_sdk, stack_model, tok, hf):
    ids = tok.encode("A lazy dog sleeps under the old oak tree")
    streamed = _streamed(stack_sdk, model=stack_model, prompt=ids, max_tokens=2, temperature=0,
                         extra_body={"prompt_logprobs": 2})
    (choice,) = streamed["choices"]
    check_prompt_logprobs(vllm_entries(choice["prompt_logprobs"], ids, 2), ids, hf_prompt_logprobs(hf, ids), 2)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "echo": True, "logprobs": 1, "stream": True, "n": 2}, "n"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True, "n": 2}, "n"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_refused_with_400_naming_the_field(stack_http, stack_model, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = stack_http.post(path, json={"model": stack_model, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_openai_sdk_sees_the_refusal(stack_sdk, stack_model):
    with pytest.raises(openai.BadRequestError, match="need n = 1"):
        stack_sdk.completions.create(model=stack_model, prompt="x", echo=True, logprobs=1, n=2, stream=True)


def test_grpc_prompt_logprobs_through_prefill_and_decode(structured_stack, tok, hf):
    """On the prefill node, from the whole prompt: right also when its prefix cache holds the prompt."""
    stub = structured_stack.stub()
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 5)
    ref = hf_prompt_logprobs(hf, ids)

    def request(**kw):
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(temperature=0),
                                  stopping=pb.StoppingCriteria(max_new_tokens=4, ignore_eos=True), **kw)

    plain = [stub.Generate(request(), timeout=60).completions[0] for _ in range(2)]
    assert plain[1].cached_tokens > 0  # the prefill node's prefix cache is warm
    reply = stub.Generate(request(prompt_logprobs=3), timeout=60)
    c = reply.completions[0]
    assert list(c.prompt_token_ids) == ids and c.cached_tokens == 0
    assert c.timings.prefill_node.startswith("prefill-") and c.timings.decode_node.startswith("decode-")
    check_prompt_logprobs(proto_entries(c.prompt_logprobs), ids, ref, 3)
    assert list(c.token_ids) == list(plain[0].token_ids)
    chunks = list(stub.GenerateStream(request(prompt_logprobs=0), timeout=60))
    assert list(chunks[0].prompt_token_ids) == ids and all(not ch.prompt_logprobs for ch in chunks[1:])
    check_prompt_logprobs(proto_entries(chunks[0].prompt_logprobs), ids, ref, 0)
    several = stub.Generate(request(prompt_logprobs=1, n=2), timeout=60).completions
    assert [len(x.prompt_logprobs) for x in several] == [len(ids) - 1, 0]  # index 0 carries them


def test_grpc_prompt_logprobs_validated(structured_stack):
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        structured_stack.stub().Generate(pb.GenerateRequest(text="x", prompt_logprobs=21), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_logprobs" in err.value.details()
