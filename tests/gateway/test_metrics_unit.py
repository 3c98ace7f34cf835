"""engine.metrics: names, labels and vLLM buckets, on a metrics port and as a text exposition;
request series on the gateway / router, engine and token series on the nodes (each counted once);
the vllm prefix; one exposition format whatever the Accept header."""
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import (ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, Metrics,
                            start_metrics_server, token_buckets)

NODE = {
    "num_requests_running": "gauge", "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge", "gpu_cache_usage_perc": "gauge", "cache_config_info": "gauge",
    "kv_free_blocks": "gauge", "kv_total_blocks": "gauge", "active_leases": "gauge",
    "prefix_cache_queries": "counter", "prefix_cache_hits": "counter",
    "prompt_tokens": "counter", "generation_tokens": "counter", "kv_transfer_bytes": "counter",
    "kv_transfer_early_bytes": "counter", "kv_transfer_streams": "counter",
    "aborts": "counter", "kv_transfer_seconds": "histogram",
    "num_preemptions": "counter", "iteration_tokens_total": "histogram",
}
REQUEST = {
    "num_requests_running": "gauge", "aborts": "counter", "request_success": "counter",
    "time_to_first_token_seconds": "histogram", "inter_token_latency_seconds": "histogram",
    "time_per_output_token_seconds": "histogram", "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram", "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram", "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram", "request_max_num_generation_tokens": "histogram",
}
# Prometheus 2.x's scrape Accept header: without a fixed format it gets OpenMetrics with `_` for `:`
PROMETHEUS_2_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                       "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.parametrize("role, expected", [("decode", NODE), ("prefill", NODE), ("router", REQUEST),
                                            ("gateway", REQUEST)])
def test_series_per_role(role, expected):
    m = Metrics("tiny", role)
    if role in ("decode", "prefill"):
        m.set_cache_config(16, 64)
    fams = families(m.exposition()[0].decode())
    assert {name: f.type for name, f in fams.items()} == {"pdserve:" + k: v for k, v in expected.items()}
    for f in fams.values():
        for s in f.samples:
            assert s.labels["model_name"] == "tiny" and s.labels["role"] == role


def test_buckets_are_vllms():
    fams = families(Metrics("tiny", "router", max_model_len=4096).exposition()[0].decode())
    buckets = lambda name: [float(s.labels["le"]) for s in fams[name].samples
                            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert buckets("pdserve:time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert len(TTFT_BUCKETS) == 22 and len(ITL_BUCKETS) == 19 and len(REQUEST_LATENCY_BUCKETS) == 21
    assert buckets("pdserve:e2e_request_latency_seconds") == list(REQUEST_LATENCY_BUCKETS)
    assert buckets("pdserve:request_prompt_tokens") == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert token_buckets(4096)[-1] == 2000 and token_buckets(5000)[-1] == 5000


def test_vllm_prefix_and_finished_reasons():
    m = Metrics("tiny", "router", prefix="vllm")
    m.request_success("eos").inc()
    m.request_success("stop").inc()
    fams = families(m.exposition()[0].decode())
    assert all(name.startswith("vllm:") for name in fams)
    reasons = {s.labels["finished_reason"]: s.value for s in fams["vllm:request_success"].samples}
    assert reasons == {"length": 0, "stop": 2, "abort": 0, "time_limit": 0, "error": 0}
    with pytest.raises(ValueError, match="prefix"):
        Metrics("tiny", "router", prefix="tgi")


def test_updates_show_on_metrics_port_in_one_format():
    node, router = Metrics("tiny", "prefill"), Metrics("tiny", "router")
    node.prompt_tokens.inc(7)
    node.set_load({"num_running": 2, "num_waiting": 1, "free_blocks": 30, "total_blocks": 40,
                   "num_prefilled_held": 3})
    router.request_success("stop").inc()
    router.time_to_first_token_seconds.observe(0.03)
    servers = [start_metrics_server(0, registry=m) for m in (node, router)]
    try:
        texts = {accept: "".join(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5,
                                           headers={"Accept": accept}).text for _, port in servers)
                 for accept in ("", "text/plain", PROMETHEUS_2_ACCEPT,
                                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8")}
    finally:
        for server, _ in servers:
            server.shutdown()
    assert len(set(texts.values())) == 1  # same names and format whatever the client asks
    values = {(s.name, s.labels.get("finished_reason"), s.labels.get("le")): s.value
              for f in text_string_to_metric_families(texts[""]) for s in f.samples}
    assert values[("pdserve:prompt_tokens_total", None, None)] == 7
    assert values[("pdserve:request_success_total", "stop", None)] == 1
    assert values[("pdserve:request_success_total", "length", None)] == 0
    assert values[("pdserve:time_to_first_token_seconds_count", None, None)] == 1
    assert values[("pdserve:time_to_first_token_seconds_bucket", None, "0.04")] == 1
    assert values[("pdserve:time_to_first_token_seconds_bucket", None, "0.02")] == 0
    assert values[("pdserve:kv_cache_usage_perc", None, None)] == pytest.approx(0.25)
    assert values[("pdserve:gpu_cache_usage_perc", None, None)] == pytest.approx(0.25)
    assert values[("pdserve:active_leases", None, None)] == 3


def test_bad_role_rejected():
    with pytest.raises(ValueError, match="role"):
        Metrics("tiny", "worker")
