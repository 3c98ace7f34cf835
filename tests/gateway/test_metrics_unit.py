"""engine.metrics: names, labels and vLLM buckets, on a metrics port and as a text exposition."""
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import (ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS, Metrics,
                            start_metrics_server)

EXPECTED = {
    "pdserve:num_requests_running": "gauge", "pdserve:num_requests_waiting": "gauge",
    "pdserve:kv_cache_usage_perc": "gauge", "pdserve:kv_free_blocks": "gauge",
    "pdserve:kv_total_blocks": "gauge", "pdserve:active_leases": "gauge",
    "pdserve:prefix_cache_queries": "counter", "pdserve:prefix_cache_hits": "counter",
    "pdserve:prompt_tokens": "counter", "pdserve:generation_tokens": "counter",
    "pdserve:request_success": "counter", "pdserve:kv_transfer_bytes": "counter",
    "pdserve:aborts": "counter",
    "pdserve:time_to_first_token_seconds": "histogram",
    "pdserve:inter_token_latency_seconds": "histogram",
    "pdserve:e2e_request_latency_seconds": "histogram",
    "pdserve:request_queue_time_seconds": "histogram",
    "pdserve:kv_transfer_seconds": "histogram",
}


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_names_types_labels_and_buckets():
    m = Metrics("tiny", "decode")
    fams = families(m.exposition()[0].decode())
    assert {name: f.type for name, f in fams.items()} == EXPECTED
    for f in fams.values():
        for s in f.samples:
            assert s.labels["model_name"] == "tiny" and s.labels["role"] == "decode"
    buckets = lambda name: [float(s.labels["le"]) for s in fams[name].samples
                            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    assert buckets("pdserve:time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert len(TTFT_BUCKETS) == 22 and len(ITL_BUCKETS) == 19 and len(REQUEST_LATENCY_BUCKETS) == 21
    assert buckets("pdserve:e2e_request_latency_seconds") == list(REQUEST_LATENCY_BUCKETS)


def test_updates_show_on_metrics_port():
    m = Metrics("tiny", "prefill")
    m.prompt_tokens.inc(7)
    m.request_success("stop").inc()
    m.time_to_first_token_seconds.observe(0.03)
    m.set_load({"num_running": 2, "num_waiting": 1, "free_blocks": 30, "total_blocks": 40,
                "num_prefilled_held": 3})
    server, port = start_metrics_server(0, registry=m)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        server.shutdown()
    values = {(s.name, s.labels.get("finished_reason"), s.labels.get("le")): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert values[("pdserve:prompt_tokens_total", None, None)] == 7
    assert values[("pdserve:request_success_total", "stop", None)] == 1
    assert values[("pdserve:request_success_total", "length", None)] == 0
    assert values[("pdserve:time_to_first_token_seconds_count", None, None)] == 1
    assert values[("pdserve:time_to_first_token_seconds_bucket", None, "0.04")] == 1
    assert values[("pdserve:time_to_first_token_seconds_bucket", None, "0.02")] == 0
    assert values[("pdserve:kv_cache_usage_perc", None, None)] == pytest.approx(0.25)
    assert values[("pdserve:active_leases", None, None)] == 3


def test_bad_role_rejected():
    with pytest.raises(ValueError, match="role"):
        Metrics("tiny", "worker")
