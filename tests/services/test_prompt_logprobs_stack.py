"""Colocated serving (`--num-prefill 0`: the decode node runs its own prompts) with a tiny KV cache
(10 blocks of 16 tokens) and a 32-token prefill chunk:
- gRPC prompt_logprobs computed by the decode node itself, for a prompt longer than the chunk and
  with its prefix cache warm, equal HF's log-softmax;
- the node's metrics: num_preemptions grows when concurrent requests outgrow the KV cache, and
  iteration_tokens_total counts one observation per engine step with the step's tokens."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.pdserve.v1 import generation_pb2 as pb
from tests.engine.helpers import check_prompt_logprobs, hf_model, hf_prompt_logprobs, random_prompts
from tests.services.helpers import assert_idle
from tests.services.stack import free_port, start_stack

pytestmark = pytest.mark.timeout(300)
CHUNK = 32
METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def stack(tiny):
    args = ("--num-gpu-blocks", "10", "--max-num-batched-tokens", str(CHUNK), "--metrics-port", str(METRICS_PORT))
    with start_stack(tiny, num_prefill=0, num_decode=1, extra_args=args) as s:
        yield s


def request(ids: list[int], max_tokens: int, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(temperature=0),
                              stopping=pb.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True), **kw)


def node_metrics() -> dict[str, float]:
    """decode-0's samples (metrics port + 1), by name and le."""
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT + 1}/metrics", timeout=10).text
    return {s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else ""): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def scrape_after_refresh() -> dict[str, float]:
    time.sleep(1.5)  # the node refreshes its metrics every second
    return node_metrics()


def test_colocated_prompt_logprobs_match_hf(stack, tiny):
    stub = stack.stub()
    ids = random_prompts(1, 49152, lo=70, hi=70, seed=21)[0]  # longer than the prefill chunk
    plain = [stub.Generate(request(ids, 3), timeout=60).completions[0] for _ in range(2)]
    assert plain[1].cached_tokens > 0
    c = stub.Generate(request(ids, 3, prompt_logprobs=2), timeout=60).completions[0]
    assert c.cached_tokens == 0 and c.timings.prefill_node == c.timings.decode_node == "decode-0"
    check_prompt_logprobs([(e.token_id, e.logprob, e.rank, [(t.token_id, t.logprob) for t in e.top])
                           for e in c.prompt_logprobs], ids, hf_prompt_logprobs(hf_model(tiny), ids), 2)
    assert list(c.token_ids) == list(plain[0].token_ids)
    assert_idle(stub)


def test_iteration_tokens_one_observation_per_step(stack):
    """One request alone, prompt within one chunk and never cached: P + G - 1 tokens in G steps."""
    before = scrape_after_refresh()
    ids = random_prompts(1, 49152, lo=20, hi=20, seed=22)[0]
    c = stack.stub().Generate(request(ids, 5), timeout=60).completions[0]
    assert c.cached_tokens == 0 and c.completion_tokens == 5
    after = scrape_after_refresh()
    grown = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("pdserve:iteration_tokens_total")}
    assert grown["pdserve:iteration_tokens_total_count"] == 5
    assert grown["pdserve:iteration_tokens_total_sum"] == len(ids) + 5 - 1
    assert grown["pdserve:iteration_tokens_total_bucket{le=1.0}"] == 4  # the decode steps
    assert grown["pdserve:iteration_tokens_total_bucket{le=16.0}"] == 4  # the 20-token prefill is above 16
    assert grown["pdserve:iteration_tokens_total_bucket{le=32.0}"] == 5


def test_preemptions_counted(stack):
    before = scrape_after_refresh()
    prompts = random_prompts(6, 49152, lo=40, hi=40, seed=23)  # 6 x (40 + 60) tokens, 160 in the cache
    stub = stack.stub()
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda p: stub.Generate(request(p, 60), timeout=120), prompts))
    assert all(r.completions[0].completion_tokens == 60 for r in replies)
    after = scrape_after_refresh()
    assert after["pdserve:num_preemptions_total"] > before.get("pdserve:num_preemptions_total", 0.0)
    steps = after["pdserve:iteration_tokens_total_count"] - before["pdserve:iteration_tokens_total_count"]
    tokens = after["pdserve:iteration_tokens_total_sum"] - before["pdserve:iteration_tokens_total_sum"]
    assert steps >= 60 and tokens >= 6 * (40 + 60 - 1)  # recomputation after a preemption adds tokens
    assert after["pdserve:iteration_tokens_total_bucket{le=32.0}"] == after["pdserve:iteration_tokens_total_count"]
    assert_idle(stub)
