"""The HTTP gateway on a real stack (router + prefill + decode + gateway processes on loopback,
tiny random llama): OpenAI SDK, raw SSE framing, /generate, auth, metrics, bad inputs."""
from __future__ import annotations

import json
import re
import threading
import time

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.pdserve.v1 import generation_pb2 as pb
from tests.services.stack import free_port, start_stack

KEY = "sk-test-gateway"
HEADERS = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.timeout(300)


METRICS_PORT = free_port()  # the router's; prefill-0 on +1, decode-0 on +2 (pdserve serve --metrics-port)


@pytest.fixture(scope="module")
def stack(make_tiny_model):
    with start_stack(make_tiny_model("llama"), gateway=True,
                     extra_args=("--api-key", KEY, "--metrics-port", str(METRICS_PORT))) as s:
        assert s.gateway_url, "".join(s.output[-40:])
        yield s


@pytest.fixture(scope="module")
def url(stack) -> str:
    return stack.gateway_url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def sdk(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "Tell me a story about a cat."}]


# -- OpenAI SDK ------------------------------------------------------------------------------------

def test_models_version_health(http, model):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert models["data"][0]["max_model_len"] == 256
    assert isinstance(http.get("/version").json()["version"], str)
    assert httpx.get(http.base_url.join("/health")).status_code == 200  # no key needed


def test_completions_stream_equals_non_stream_greedy(sdk, model):
    full = sdk.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                  temperature=0)
    choice = full.choices[0]
    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(sdk.completions.create(model=model, prompt="The capital of France is", max_tokens=12,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert usage_chunks[0].usage.completion_tokens == full.usage.completion_tokens
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == choice.text
    assert len(text_chunks) == full.usage.completion_tokens  # one token per chunk
    assert text_chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_stream_equals_non_stream_greedy(sdk, model):
    full = sdk.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(sdk.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_seed_n_and_stop(sdk, model):
    a = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7)
    b = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text
    two = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=4, n=2, temperature=1.0,
                                 seed=3)
    assert sorted(c.index for c in two.choices) == [0, 1]
    chat_two = sdk.chat.completions.create(model=model, messages=CHAT, max_tokens=3, n=2, seed=5)
    assert sorted(c.index for c in chat_two.choices) == [0, 1]
    greedy = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0)
    text = greedy.choices[0].text
    assert len(text) >= 6, text
    stop = text[3:6]
    stopped = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0,
                                     stop=[stop])
    assert stopped.choices[0].text == text[:text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logprobs(sdk, model):
    comp = sdk.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(abs(max(top.values()) - x) < 1e-4 for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    chat = sdk.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    streamed = list(sdk.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0,
                                                logprobs=True, top_logprobs=1, stream=True))
    tokens = [c.choices[0].logprobs.content[0].token for c in streamed[1:]]
    assert tokens == [c.token for c in content]


# -- raw SSE framing -------------------------------------------------------------------------------

def _events(body: bytes) -> list[bytes]:
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: [DONE]") == 1
    events = body.split(b"\n\n")
    assert events[-1] == b""
    for e in events[:-1]:
        assert e.startswith(b"data: ") and b"\n" not in e, e
    return events[:-1]


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True}),
    ("/v1/completions", {"prompt": "Hi there", "max_tokens": 5, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}}),
])
def test_sse_framing_bytewise(http, model, route, body):
    with http.stream("POST", route, json={"model": model, **body}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    events = _events(raw)
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    if route == "/v1/chat/completions":
        assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(p["object"] == "chat.completion.chunk" for p in payloads)
        finishes = [p["choices"][0]["finish_reason"] for p in payloads]
    else:
        assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
        finishes = [p["choices"][0]["finish_reason"] for p in payloads[:-1]]
    assert finishes[-1] in ("length", "stop") and all(f is None for f in finishes[:-1])
    assert len({p["id"] for p in payloads}) == 1


# -- legacy /generate --------------------------------------------------------------------------------

def test_legacy_generate_shape(http, model):
    r = http.post("/generate", json={"prompt": "Hello", "model": model, "max_tokens": 4, "temperature": 0,
                                     "top_p": 1.0, "n": 2})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"text", "usage", "model"}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert body["model"] == model and len(body["text"]) == 2 and all(isinstance(t, str) for t in body["text"])
    assert body["text"][0] == body["text"][1]  # greedy: both samples equal
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 8


def test_tokenize_detokenize_roundtrip(http, model):
    tok = http.post("/tokenize", json={"model": model, "prompt": "Hello world", "add_special_tokens": False}).json()
    assert tok["count"] == len(tok["tokens"]) >= 2 and tok["max_model_len"] == 256
    assert http.post("/detokenize", json={"model": model, "tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}


# -- auth ------------------------------------------------------------------------------------------

PROTECTED = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/version", None),
             ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
             ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
             ("POST", "/generate", {"prompt": "hi", "max_tokens": 1}),
             ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]})]


def test_api_keys_on_every_route(url, stack):
    with httpx.Client(base_url=url, timeout=30) as anon:
        for method, path, body in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                            {"Authorization": f"Basic {KEY}"}):
                r = anon.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and "API key" in err["message"]
        assert anon.get("/health").status_code == 200
        assert anon.get("/v1/models", headers=HEADERS).status_code == 200
    stub = stack.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=10,
                          metadata=(("authorization", f"Bearer {KEY}"),)).max_model_len == 256


# -- metrics ---------------------------------------------------------------------------------------

def _scrape(http, url: str = "/metrics", role: str = "gateway") -> dict:
    r = http.get(url)
    assert r.status_code == 200
    return {(s.name, s.labels.get("finished_reason"), s.labels.get("le")): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples
            if s.labels.get("role") == role}


def test_router_and_node_metrics_ports(stack, http, sdk, model):
    router_url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    prefill_url, decode_url = (f"http://127.0.0.1:{METRICS_PORT + k}/metrics" for k in (1, 2))
    time.sleep(1.2)  # nodes refresh their metrics every second
    before, gw_before = _scrape(http, router_url, "router"), _scrape(http)
    p_before, d_before = _scrape(http, prefill_url, "prefill"), _scrape(http, decode_url, "decode")
    usages = [sdk.completions.create(model=model, prompt=f"Router {i}", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True}).usage for i in range(2)]
    stub = stack.stub()
    for i in range(2):  # straight to the router: the router counts these, the gateway the HTTP ones
        usages.append(stub.Generate(pb.GenerateRequest(
            text=f"gRPC {i}", stopping=pb.StoppingCriteria(max_new_tokens=3, ignore_eos=True)),
            metadata=(("authorization", f"Bearer {KEY}"),), timeout=60).usage)
    after, gw_after = _scrape(http, router_url, "router"), _scrape(http)

    def moved(name, reason=None, a=after, b=before):
        return a.get((name, reason, None), 0) - b.get((name, reason, None), 0)

    for a, b in ((after, before), (gw_after, gw_before)):  # each request counted once
        assert moved("pdserve:request_success_total", "length", a, b) == 2
        assert moved("pdserve:e2e_request_latency_seconds_count", None, a, b) == 2
        assert moved("pdserve:request_generation_tokens_sum", None, a, b) == 6
    assert moved("pdserve:time_to_first_token_seconds_count") == 2
    assert moved("pdserve:inter_token_latency_seconds_count") == 4
    assert moved("pdserve:time_per_output_token_seconds_count") == 4
    assert moved("pdserve:request_decode_time_seconds_count") == 2
    assert moved("pdserve:request_prefill_time_seconds_count") == 2
    assert not any(name.startswith(("pdserve:generation_tokens", "pdserve:prompt_tokens", "pdserve:kv_"))
                   for name, _, _ in {**after, **gw_after})  # tokens and KV: counted by the nodes
    assert after[("pdserve:num_requests_running", None, None)] == 0
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    deadline = time.monotonic() + 10
    while True:
        p_after, d_after = _scrape(http, prefill_url, "prefill"), _scrape(http, decode_url, "decode")
        p_moved = {k: v - p_before.get(k, 0) for k, v in p_after.items()}
        d_moved = {k: v - d_before.get(k, 0) for k, v in d_after.items()}
        settled = (p_moved.get(("pdserve:prompt_tokens_total", None, None)) == prompt_tokens
                   and d_moved.get(("pdserve:generation_tokens_total", None, None)) == 4 * 2)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert p_moved[("pdserve:prompt_tokens_total", None, None)] == prompt_tokens
    assert p_moved[("pdserve:prefix_cache_queries_total", None, None)] == prompt_tokens
    assert p_moved[("pdserve:generation_tokens_total", None, None)] == 4  # first tokens
    assert d_moved[("pdserve:generation_tokens_total", None, None)] == 4 * 2  # the rest
    assert p_moved[("pdserve:kv_transfer_bytes_total", None, None)] > 0
    assert d_moved[("pdserve:kv_transfer_bytes_total", None, None)] == \
        p_moved[("pdserve:kv_transfer_bytes_total", None, None)]
    assert p_moved[("pdserve:kv_transfer_seconds_count", None, None)] == 4  # the sender times transfers
    for node in (p_after, d_after):  # I1: idle node, every block free
        assert node[("pdserve:kv_free_blocks", None, None)] == node[("pdserve:kv_total_blocks", None, None)] > 0
        assert node[("pdserve:kv_cache_usage_perc", None, None)] == 0
        assert node[("pdserve:num_requests_running", None, None)] == 0


def test_metrics_move_by_request_count(http, model, sdk):
    before = _scrape(http)
    usages = []
    for i in range(3):
        usages.append(sdk.completions.create(model=model, prompt=f"Count {i}", max_tokens=3,
                                             temperature=0, extra_body={"ignore_eos": True}).usage)
    for i in range(2):
        chunks = list(sdk.completions.create(model=model, prompt=f"Stream {i}", max_tokens=4, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
        usages.append(chunks[-1].usage)
    after = _scrape(http)

    def moved(name, reason=None, le=None):
        return after.get((name, reason, le), 0) - before.get((name, reason, le), 0)

    assert moved("pdserve:request_success_total", "length") == 5
    assert moved("pdserve:request_prompt_tokens_sum") == sum(u.prompt_tokens for u in usages)
    assert moved("pdserve:request_generation_tokens_sum") == sum(u.completion_tokens for u in usages) == 3 * 3 + 2 * 4
    assert moved("pdserve:e2e_request_latency_seconds_count") == 5
    assert moved("pdserve:time_to_first_token_seconds_count") >= 2
    assert moved("pdserve:inter_token_latency_seconds_count") == 2 * 3  # 4 tokens -> 3 gaps per stream
    assert moved("pdserve:e2e_request_latency_seconds_bucket", le="+Inf") == 5
    assert after[("pdserve:num_requests_running", None, None)] == 0
    names = {k[0] for k in after}
    for name in ("pdserve:aborts_total", "pdserve:request_queue_time_seconds_count",
                 "pdserve:time_per_output_token_seconds_count", "pdserve:request_decode_time_seconds_count"):
        assert name in names, name
    for name in ("pdserve:num_requests_waiting", "pdserve:kv_cache_usage_perc", "pdserve:prompt_tokens_total",
                 "pdserve:generation_tokens_total", "pdserve:kv_free_blocks", "pdserve:active_leases"):
        assert name not in names, name  # node state: no always-0 gauges or twice-counted tokens here


# -- bad inputs (RELIABILITY.md) -------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"
BAD = [  # route, body, status, message, param
    (C, {"prompt": ""}, 400, "prompt must not be empty", "prompt"),
    (C, {"prompt": []}, 400, "prompt must not be empty", "prompt"),
    (CH, {"messages": []}, 400, "messages must not be empty", "messages"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be in [1, 2147483647]", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens must be in [0, 4294967295] (uint32)", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 2**31}, 400, "max_tokens must be in [1, 2147483647]", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 2**63}, 400, "max_tokens must be in [0, 4294967295] (uint32)", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens: Input should be a valid integer", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": "16"}, 400, "max_tokens: Input should be a valid integer", "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 300}, 400, "exceeds the max model length 256", None),
    (C, {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens must be <= max_tokens (4)", "min_tokens"),
    (C, {"prompt": "x", "min_tokens": -1}, 400, "min_tokens must be in [0, 4294967295] (uint32)", "min_tokens"),
    (C, {"prompt": "x", "n": 0}, 400, "n must be in [1, 4294967295] (uint32)", "n"),
    (C, {"prompt": "x", "n": 10**9}, 400, "n must be in [1, 128]", "n"),
    (C, {"prompt": "x", "temperature": -0.5}, 400, "temperature must be >= 0", "temperature"),
    (C, {"prompt": "x", "temperature": -1e-50}, 400, "temperature must be >= 0", "temperature"),
    (C, {"prompt": "x", "temperature": 1e300}, 400, "temperature must be in [-3.4028235e+38", "temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]", "top_p"),
    (C, {"prompt": "x", "top_p": 1.5}, 400, "top_p must be in (0, 1]", "top_p"),
    (C, {"prompt": "x", "top_p": 1.0000000001}, 400, "top_p must be in (0, 1]", "top_p"),
    (C, {"prompt": "x", "top_k": -2}, 400, "top_k must be in [-1,", "top_k"),
    (C, {"prompt": "x", "top_k": 2**31}, 400, "top_k must be in [-2147483648, 2147483647] (int32)", "top_k"),
    (C, {"prompt": "x", "seed": -1}, 400, "seed must be in [0, 18446744073709551615] (uint64)", "seed"),
    (C, {"prompt": "x", "seed": 2**63}, 400, "seed must be in [0, 9223372036854775807]", "seed"),
    (C, {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty must be in [-2.0, 2.0]", "presence_penalty"),
    (C, {"prompt": "x", "logprobs": 10**6}, 400, "logprobs must be in [0, 20]", "logprobs"),
    (CH, {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "logprobs must be in [0, 20]",
     "top_logprobs"),
    (CH, {"messages": CHAT, "logprobs": True, "top_logprobs": -1}, 400, "logprobs must be in [0, 4294967295]",
     "top_logprobs"),
    (CH, {"messages": CHAT, "max_completion_tokens": 0}, 400, "max_tokens must be in [1,", "max_completion_tokens"),
    (C, {"prompt": "x", "stop": ["s"] * 10**4}, 400, "stop may hold at most 64 strings", "stop"),
    (C, {"prompt": "x", "stop": "y" * 2**20}, 400, "stop strings must be at most 1024 characters", "stop"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop strings must not be empty", "stop"),
    (C, {"prompt": "x", "stop": ""}, 400, "stop strings must not be empty", "stop"),
    (C, {"prompt": "x", "stop_token_ids": [49152]}, 400, "stop_token_ids must be < vocab size 49152", "stop_token_ids"),
    (C, {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids must hold values in [0, 4294967295]",
     "stop_token_ids"),
    (C, {"prompt": [1, 2, 10**6]}, 400, "prompt must hold token ids in [0, 49152)", "prompt"),
    (C, {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias keys must be token ids", "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"-5": 1}}, 400, "logit_bias keys must be in [0, 4294967295]", "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"49152": 1}}, 400, "logit_bias keys must be < vocab size 49152", "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"5": 100.5}}, 400, "logit_bias values must be in [-100, 100]", "logit_bias"),
    (C, {"prompt": "x", "best_of": 3}, 400, "best_of must equal n (1) or 1", "best_of"),
    (C, {"prompt": "x", "priority": 2**31}, 400, "priority must be in [", "priority"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options is only allowed",
     "stream_options"),
    (C, {"prompt": "x", "model": "no-such-model"}, 404, "does not exist", "model"),
    (CH, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role must be one of",
     "messages.0.role"),
    (C, {"prompt": "x", "echo": True, "logprobs": 1, "n": 2, "stream": True}, 400,
     "echo with logprobs need n = 1, got n = 2", "n"),
    (C, {}, 400, "prompt: Field required", "prompt"),
    ("/generate", {"prompt": "x", "stream": True}, 400, "stream is not supported on /generate", "stream"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens must hold token ids", "tokens"),
]
RAW_BAD = [
    (C, b'{"prompt": "x", "temperature": NaN}', 400, "temperature must be finite"),
    (C, b'{"prompt": "x", "presence_penalty": Infinity}', 400, "presence_penalty must be finite"),
    (C, b'{"prompt": "x", "max_tokens": ', 400, "invalid JSON body"),
    (C, b'["not", "an", "object"]', 400, "request body must be a JSON object"),
    (C, b'{"prompt": "\\ud800"}', 400, "lone surrogate"),
    (C, b'{"prompt": "\xff\xfe"}', 400, "invalid JSON body"),
    (C, b'{"prompt": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "JSON nesting exceeds the limit of 32 levels"),
    (C, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "JSON nesting exceeds the limit"),
    (C, b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}', 413, "exceeds the limit of 8388608 bytes"),
]


def _bystander(sdk, model, expected: str, results: list):
    try:
        for _ in range(3):
            chunks = sdk.completions.create(model=model, prompt="Bystander prompt", max_tokens=8, temperature=0,
                                            stream=True)
            results.append("".join(c.choices[0].text for c in chunks) == expected)
    except Exception as exc:  # reported by the assertion in the test
        results.append(exc)


def test_bad_inputs_clear_errors_bystander_unharmed(http, sdk, model):
    expected = sdk.completions.create(model=model, prompt="Bystander prompt", max_tokens=8,
                                      temperature=0).choices[0].text
    results: list = []
    bystander = threading.Thread(target=_bystander, args=(sdk, model, expected, results))
    bystander.start()
    failures = []
    for route, body, status, message, param in BAD:
        r = http.post(route, json={"model": model, **body} if "model" not in body else body)
        try:
            err = r.json()["error"]
        except Exception:
            failures.append((route, body, r.status_code, r.text[:200]))
            continue
        if r.status_code != status or message not in err["message"] or err["param"] != param:
            failures.append((route, str(body)[:80], r.status_code, err["message"][:200], err["param"]))
        assert set(err) == {"message", "type", "param", "code"}
        assert not re.search(r"Traceback|File \"|0x[0-9a-f]{6,}|/work/", err["message"])
    for route, raw, status, message in RAW_BAD:
        r = http.post(route, content=raw, headers={"content-type": "application/json"})
        err = r.json()["error"]
        if r.status_code != status or message not in err["message"]:
            failures.append((route, raw[:40], r.status_code, err["message"][:200]))
    bystander.join(120)
    assert not failures, failures
    assert results == [True, True, True]
    with http.stream("POST", C, json={"model": model, "prompt": "x", "max_tokens": 0, "stream": True}) as r:
        assert r.status_code == 400  # a streamed request's bad input is a plain HTTP error too


def _tracked(stub, request_id: str) -> list[str]:
    """Where the router or a node still holds state for `request_id` (node ids are '<id>.<p>.<i>')."""
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=10, metadata=(("authorization", f"Bearer {KEY}"),))
    held = [f"router:{r}" for r in loads.router_request_ids if r == request_id]
    held += [f"{n.node_id}:{r}" for n in loads.nodes for r in n.load.request_ids
             if r == request_id or r.startswith(request_id + ".")]
    return held


def test_client_disconnect_aborts_request(http, model, stack):
    stub = stack.stub()
    before = _scrape(http)
    with http.stream("POST", C, json={"model": model, "prompt": "Long story", "max_tokens": 200,
                                      "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [json.loads(line[len("data: "):]) for line in (next(lines) for _ in range(5)) if line]
        assert got[0]["choices"][0]["text"] is not None
    request_id = got[0]["id"].removeprefix("cmpl-")
    assert request_id
    deadline = time.monotonic() + 20
    while (held := _tracked(stub, request_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not held, f"still tracked after the client left: {held}"
    after = _scrape(http)
    key = ("pdserve:aborts_total", None, None)
    assert after[key] - before.get(key, 0) == 1
    assert after[("pdserve:num_requests_running", None, None)] == 0


def test_mid_stream_failure_is_an_error_event(http, model, stack):
    """Last in this module: it kills the decode node. The stream ends with an error object and
    [DONE], never with a normal-looking finish."""
    with http.stream("POST", C, json={"model": model, "prompt": "Doomed story", "max_tokens": 200,
                                      "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        raw, killed = b"", False
        for part in r.iter_raw():
            raw += part
            if raw.count(b"\n\n") >= 3 and not killed:
                stack.kill("decode-0")
                killed = True
    events = _events(raw)
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert "error" in payloads[-1], payloads[-1]
    err = payloads[-1]["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "unavailable"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
    assert not re.search(r"Traceback|File \"|/work/", err["message"])
