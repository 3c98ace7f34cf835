"""Metrics that drop into vLLM's dashboards: with --metrics-prefix vllm, every series vLLM's Grafana
dashboard queries exists on the stack's ports, every query of our dashboard (docs/grafana) finds
series, and the names are the same whatever Accept header the scraper sends."""
from __future__ import annotations

import json
import pathlib
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.pdserve.v1 import generation_pb2 as pb

pytestmark = pytest.mark.timeout(300)

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "grafana" / "pdserve-dashboard.json"
# The series vLLM's published dashboard (examples/online_serving/prometheus_grafana/grafana.json) reads.
VLLM_DASHBOARD_SERIES = [
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket", "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count", "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count", "vllm:gpu_cache_usage_perc", "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket", "vllm:request_success_total", "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
]
PROMETHEUS_2_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                       "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
SELECTOR = re.compile(r"(vllm:[a-zA-Z0-9_]+)(\{[^}]*\})?")


def _samples(text: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


@pytest.fixture(scope="module")
def scrape(stack_http, stack_model, structured_stack, metrics_urls):
    stack_http.post("/v1/completions", json={"model": stack_model, "prompt": "Metrics", "max_tokens": 4,
                                             "ignore_eos": True})
    with stack_http.stream("POST", "/v1/completions", json={"model": stack_model, "prompt": "More", "max_tokens": 4,
                                                            "stream": True, "ignore_eos": True}) as r:
        list(r.iter_lines())
    structured_stack.stub().Generate(pb.GenerateRequest(
        text="Direct", stopping=pb.StoppingCriteria(max_new_tokens=3, ignore_eos=True)), timeout=60)
    time.sleep(1.5)  # nodes refresh their metrics every second
    texts = {}
    for role, url in metrics_urls.items():
        for accept in ("", PROMETHEUS_2_ACCEPT):
            texts[role, accept] = httpx.get(url, headers={"Accept": accept} if accept else {}, timeout=10).text
    return texts


def test_same_names_whatever_the_accept_header(scrape, metrics_urls):
    for role in metrics_urls:
        names = [{s.name for s in _samples(scrape[role, accept])} for accept in ("", PROMETHEUS_2_ACCEPT)]
        assert names[0] == names[1] and names[0], role
        assert all(n.startswith("vllm:") for n in names[0]), role


def test_vllm_dashboard_series_exist(scrape, stack_model):
    samples = [s for (_, accept), text in scrape.items() if not accept for s in _samples(text)]
    present = {s.name for s in samples if s.labels.get("model_name") == stack_model}
    assert [n for n in VLLM_DASHBOARD_SERIES if n not in present] == []
    success = {s.labels["finished_reason"] for s in samples if s.name == "vllm:request_success_total"}
    assert "eos" not in success and "stop" in success


def test_each_request_counted_once(scrape, stack_model):
    """Two HTTP requests (the gateway's) and one gRPC request (the router's), whatever ran before."""
    def total(role, name):
        return sum(s.value for s in _samples(scrape[role, ""]) if s.name == name)

    gateway, router = (total(r, "vllm:e2e_request_latency_seconds_count") for r in ("gateway", "router"))
    assert gateway >= 2 and router >= 1
    for role in ("gateway", "router"):
        assert total(role, "vllm:generation_tokens_total") == 0  # tokens: the nodes only
    generated = total("prefill", "vllm:generation_tokens_total") + total("decode", "vllm:generation_tokens_total")
    relayed = total("gateway", "vllm:request_generation_tokens_sum") + total("router", "vllm:request_generation_tokens_sum")
    assert generated == relayed > 0


def test_our_dashboard_queries_find_series(scrape, stack_model):
    samples = [s for (_, accept), text in scrape.items() if not accept for s in _samples(text)]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    for expr in exprs:
        expr = expr.replace("${prefix}", "vllm").replace("$model_name", stack_model)
        selectors = SELECTOR.findall(expr)
        assert selectors, expr
        for name, labels in selectors:
            wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            assert any(s.name == name and all(s.labels.get(k) == v for k, v in wanted.items()) for s in samples), \
                (name, wanted)
