import math

import pytest

from engine.sampling_params import (MAX_LOGPROBS, MAX_N, MAX_STOP_LEN, MAX_STOP_STRINGS,
                                    MAX_TOP_K, SamplingParams)

NAN, INF = float("nan"), float("inf")

# (field values, words the error message must contain: the field and its limit)
INVALID = [
    ({"temperature": NAN}, ["temperature", "finite"]),
    ({"temperature": INF}, ["temperature", "finite"]),
    ({"temperature": -0.1}, ["temperature", ">= 0"]),
    ({"temperature": "hot"}, ["temperature", "number"]),
    ({"top_p": 0.0}, ["top_p", "(0, 1]"]),
    ({"top_p": 1.01}, ["top_p", "(0, 1]"]),
    ({"top_p": NAN}, ["top_p", "finite"]),
    ({"top_k": -2}, ["top_k", "-1"]),
    ({"top_k": MAX_TOP_K + 1}, ["top_k", str(MAX_TOP_K)]),
    ({"top_k": 2**63}, ["top_k", str(MAX_TOP_K)]),
    ({"top_k": 1.5}, ["top_k", "integer"]),
    ({"top_k": True}, ["top_k", "integer"]),
    ({"min_p": -0.1}, ["min_p", "[0.0, 1.0]"]),
    ({"min_p": 1.5}, ["min_p", "[0.0, 1.0]"]),
    ({"min_p": NAN}, ["min_p", "finite"]),
    ({"repetition_penalty": 0.0}, ["repetition_penalty", "> 0"]),
    ({"repetition_penalty": -1.0}, ["repetition_penalty", "> 0"]),
    ({"repetition_penalty": NAN}, ["repetition_penalty", "finite"]),
    ({"repetition_penalty": INF}, ["repetition_penalty", "finite"]),
    ({"presence_penalty": 2.5}, ["presence_penalty", "[-2.0, 2.0]"]),
    ({"presence_penalty": NAN}, ["presence_penalty", "finite"]),
    ({"frequency_penalty": -2.5}, ["frequency_penalty", "[-2.0, 2.0]"]),
    ({"frequency_penalty": -INF}, ["frequency_penalty", "finite"]),
    ({"max_tokens": 0}, ["max_tokens", "[1, 2147483647]"]),
    ({"max_tokens": -1}, ["max_tokens", "[1, 2147483647]"]),
    ({"max_tokens": 2**31}, ["max_tokens", "[1, 2147483647]"]),
    ({"max_tokens": 2**63}, ["max_tokens", "[1, 2147483647]"]),
    ({"max_tokens": 10.5}, ["max_tokens", "integer"]),
    ({"max_tokens": 16.0}, ["max_tokens", "integer"]),
    ({"max_tokens": True}, ["max_tokens", "integer"]),
    ({"max_tokens": "16"}, ["max_tokens", "integer"]),
    ({"min_tokens": -1}, ["min_tokens", "[0, 2147483647]"]),
    ({"min_tokens": 17}, ["min_tokens", "max_tokens (16)"]),
    ({"min_tokens": 2**31}, ["min_tokens", "2147483647"]),
    ({"n": 0}, ["n ", "[1, 128]"]),
    ({"n": -1}, ["n ", "[1, 128]"]),
    ({"n": 10**9}, ["n ", f"[1, {MAX_N}]"]),
    ({"n": False}, ["n ", "integer"]),
    ({"logprobs": -1}, ["logprobs", "[0, 20]"]),
    ({"logprobs": 10**6}, ["logprobs", f"[0, {MAX_LOGPROBS}]"]),
    ({"stop": ""}, ["stop", "empty"]),
    ({"stop": ["ok", ""]}, ["stop", "empty"]),
    ({"stop": "x" * (1 << 20)}, ["stop", f"{MAX_STOP_LEN} characters"]),
    ({"stop": ["s"] * 10**4}, ["stop", f"at most {MAX_STOP_STRINGS} strings"]),
    ({"stop": [1, 2]}, ["stop", "strings"]),
    ({"stop": 7}, ["stop", "string"]),
    ({"stop_token_ids": [3, -1]}, ["stop_token_ids", "non-negative"]),
    ({"stop_token_ids": [1.0]}, ["stop_token_ids", "integer"]),
    ({"logit_bias": {-5: 1.0}}, ["logit_bias keys", "non-negative"]),
    ({"logit_bias": {"5": 1.0}}, ["logit_bias keys", "integer"]),
    ({"logit_bias": {5: NAN}}, ["logit_bias values", "finite"]),
    ({"logit_bias": {5: INF}}, ["logit_bias values", "finite"]),
    ({"logit_bias": {5: 100.5}}, ["logit_bias values", "[-100, 100]"]),
    ({"logit_bias": {5: -101}}, ["logit_bias values", "[-100, 100]"]),
    ({"seed": -1}, ["seed", "[0, 9223372036854775807]"]),
    ({"seed": 2**63}, ["seed", "9223372036854775807"]),
    ({"seed": 1.0}, ["seed", "integer"]),
    ({"seed": True}, ["seed", "integer"]),
]


@pytest.mark.parametrize("kwargs,words", INVALID, ids=[repr(k)[:60] for k, _ in INVALID])
def test_invalid_values_are_rejected_naming_the_limit(kwargs, words):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    for word in words:
        assert word in message, (message, word)
    assert len(message) < 300  # a 1 MB stop string is not echoed back


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not (p.ignore_eos or p.include_stop_str_in_output or p.greedy)


def test_limits_themselves_are_accepted():
    p = SamplingParams(n=MAX_N, logprobs=MAX_LOGPROBS, top_k=MAX_TOP_K, top_p=1.0, min_p=1.0,
                       presence_penalty=-2, frequency_penalty=2, max_tokens=2**31 - 1,
                       min_tokens=2**31 - 1, seed=2**63 - 1, temperature=0,
                       stop=["x" * MAX_STOP_LEN] * MAX_STOP_STRINGS, logit_bias={0: -100, 1: 100})
    assert p.greedy and p.max_stop_len == MAX_STOP_LEN
    assert p.logit_bias == {0: -100.0, 1: 100.0}


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, temperature=1, max_tokens=None, stop_token_ids=(7,))
    assert p.stop == ["###"] and p.top_k == 0 and p.stop_token_ids == [7]
    assert isinstance(p.temperature, float)
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_verify_checks_token_ids_against_the_vocabulary():
    with pytest.raises(ValueError, match="stop_token_ids must be < vocab size 100, got 100"):
        SamplingParams(stop_token_ids=[5, 100]).verify(100, 2048, 10)
    with pytest.raises(ValueError, match="logit_bias keys must be < vocab size 100, got 150"):
        SamplingParams(logit_bias={150: 1.0}).verify(100, 2048, 10)
    assert SamplingParams(stop_token_ids=[99], logit_bias={0: 1}).verify(100, 2048, 10) == 16


def test_verify_checks_the_context_length_and_returns_max_tokens():
    with pytest.raises(ValueError, match=r"prompt length 2040 \+ max_tokens 16 = 2056 exceeds "
                                         r"the max model length 2048"):
        SamplingParams().verify(100, 2048, 2040)
    assert SamplingParams().verify(100, 2048, 2032) == 16
    assert SamplingParams(max_tokens=None).verify(100, 2048, 48) == 2000
    with pytest.raises(ValueError, match="prompt length 2048 .* max model length 2048"):
        SamplingParams(max_tokens=None).verify(100, 2048, 2048)
    with pytest.raises(ValueError, match="min_tokens 100 exceeds the 48 tokens left"):
        SamplingParams(max_tokens=None, min_tokens=100).verify(100, 2048, 2000)


def test_clone_is_deep():
    p = SamplingParams(stop=["a"], stop_token_ids=[1], logit_bias={1: 2.0}, seed=3)
    q = p.clone()
    q.stop.append("b")
    q.stop_token_ids.append(2)
    q.logit_bias[5] = 1.0
    assert p.stop == ["a"] and p.stop_token_ids == [1] and p.logit_bias == {1: 2.0}
    assert q.seed == 3 and not math.isnan(q.temperature)
