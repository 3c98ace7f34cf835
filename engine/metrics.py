"""Prometheus metrics shared by every pdserve process (router, prefill, decode, gateway).

Names, meanings and histogram buckets follow vLLM's (`vllm:` -> `pdserve:`; `prefix="vllm"`, the
CLI's `--metrics-prefix vllm`, keeps vLLM's own names so its Grafana dashboard and KEDA / HPA rules
work unchanged), plus our own KV-transfer and lease metrics. Every series carries the labels
`model_name` and `role`; `finished_reason` takes vLLM's values (an end-of-sequence is `stop`).
Every port serves the same text format (0.0.4) whatever the Accept header asks, so a name is
never rewritten (Prometheus 2.x asks for OpenMetrics with `_`-escaping of `:`).
Each process builds one `Metrics` object with its own `CollectorRegistry` (never the global
one, so tests can run several in one interpreter) and exposes it either on a metrics port
(`start_metrics_server`) or through a web route (`Metrics.exposition()`).

Exposed names (counters get prometheus' `_total` suffix):
  gauges      pdserve:num_requests_running, pdserve:num_requests_waiting,
              pdserve:kv_cache_usage_perc (0..1) and its older vLLM name pdserve:gpu_cache_usage_perc,
              pdserve:kv_free_blocks, pdserve:kv_total_blocks, pdserve:active_leases,
              pdserve:cache_config_info{block_size, num_gpu_blocks} (nodes)
  counters    pdserve:prefix_cache_queries (tokens), pdserve:prefix_cache_hits (tokens),
              pdserve:prompt_tokens, pdserve:generation_tokens, pdserve:num_preemptions (nodes),
              pdserve:request_success{finished_reason}, pdserve:kv_transfer_bytes, pdserve:aborts
  histograms  pdserve:time_to_first_token_seconds, pdserve:inter_token_latency_seconds,
              pdserve:e2e_request_latency_seconds, pdserve:request_queue_time_seconds,
              pdserve:kv_transfer_seconds, pdserve:time_per_output_token_seconds (per token gap,
              as vLLM v1), pdserve:request_prefill_time_seconds, pdserve:request_decode_time_seconds,
              pdserve:request_prompt_tokens, pdserve:request_generation_tokens (per completion),
              pdserve:request_max_num_generation_tokens (per request),
              pdserve:iteration_tokens_total (tokens computed per engine step, nodes; vLLM's name,
              whose `_total` is part of the histogram's name)
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PREFIX = "pdserve:"
PREFIXES = ("pdserve", "vllm")
ROLES = ("router", "prefill", "decode", "both", "gateway")
REQUEST_ROLES = ("router", "gateway")  # count requests; the nodes count tokens, KV and cache state
# gRPC metadata the gateway sends with the requests it counts itself, so the router does not count
# them again: each request is counted once, and sum() over roles is the total.
COUNTED_BY_KEY = "x-pdserve-counted-by"
LABELS = ("model_name", "role")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards and SLO rules carry over.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Ours: one KV hand-off moves from a few KB (tiny models, CPU) to GBs (long prompts, NCCL).
KV_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                       5.0, 10.0, 30.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # vLLM's

# vLLM's request token-count buckets: 1, 2, 5, 10, 20, 50, ... up to the context limit
def token_buckets(max_model_len: int) -> tuple[float, ...]:
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


DEFAULT_MAX_MODEL_LEN = 131072
FINISHED_REASONS = ("length", "stop", "abort", "time_limit", "error")

__all__ = ["Metrics", "StreamTracker", "start_metrics_server", "CONTENT_TYPE_LATEST", "PREFIX", "COUNTED_BY_KEY",
           "TTFT_BUCKETS", "ITL_BUCKETS", "REQUEST_LATENCY_BUCKETS", "KV_TRANSFER_BUCKETS"]


class Metrics:
    """Every pdserve metric, bound to one (model_name, role); one instance per process."""

    def __init__(self, model_name: str, role: str, registry: CollectorRegistry | None = None,
                 prefix: str = "pdserve", max_model_len: int = DEFAULT_MAX_MODEL_LEN):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if prefix not in PREFIXES:
            raise ValueError(f"metrics prefix must be one of {PREFIXES}, got {prefix!r}")
        self.model_name, self.role, self.prefix = model_name, role, prefix + ":"
        name_prefix = self.prefix
        disable_created_metrics()  # as vLLM: no `_created` twin series (process-wide setting)
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"model_name": model_name, "role": role}

        def gauge(name: str, doc: str):
            return Gauge(name_prefix + name, doc, LABELS, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str):
            return Counter(name_prefix + name, doc, LABELS, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str, buckets):
            return Histogram(name_prefix + name, doc, LABELS, buckets=buckets,
                             registry=self.registry).labels(**labels)

        self.num_requests_running = gauge("num_requests_running", "Requests running (in a batch).")
        if role in REQUEST_ROLES:
            self._request_series(counter, histogram, max_model_len)
        else:
            self._node_series(gauge, counter, histogram)

    def _node_series(self, gauge, counter, histogram) -> None:
        """Engine, KV cache and token series: only the nodes know them (never 0-gauges elsewhere)."""
        name_prefix = self.prefix
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to run.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc",
                                         "KV cache usage: 1 = every block in use.")
        self.gpu_cache_usage_perc = gauge("gpu_cache_usage_perc",
                                          "KV cache usage (vLLM's older name of kv_cache_usage_perc).")
        self._cache_config_info = Gauge(name_prefix + "cache_config_info", "KV cache configuration.",
                                        LABELS + ("block_size", "num_gpu_blocks"), registry=self.registry)
        self.kv_free_blocks = gauge("kv_free_blocks", "Free KV cache blocks.")
        self.kv_total_blocks = gauge("kv_total_blocks", "Total KV cache blocks (null block excluded).")
        self.active_leases = gauge("active_leases",
                                   "Open KV reservations (decode) or KV held for export (prefill).")
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens produced.")
        self.kv_transfer_bytes = counter("kv_transfer_bytes",
                                         "KV cache bytes moved from prefill to decode nodes.")
        self.kv_transfer_early_bytes = counter(
            "kv_transfer_early_bytes", "KV cache bytes a prefill node handed to a transfer while the prompt was "
            "still being prefilled (chunks streamed ahead of the last one).")
        self.kv_transfer_streams = counter(
            "kv_transfer_streams", "PushKV streams a decode node landed over gRPC (a transfer over N lanes counts N).")
        self.aborts = counter("aborts", "Requests aborted (client cancel, disconnect, deadline).")
        self.kv_transfer_seconds = histogram(
            "kv_transfer_seconds", "Duration of one KV hand-off, seconds.", KV_TRANSFER_BUCKETS)
        self.num_preemptions = counter("num_preemptions",
                                       "Running requests preempted by the scheduler (KV cache full; recomputed later).")
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per engine step.",
                                          ITERATION_TOKENS_BUCKETS)

    def _request_series(self, counter, histogram, max_model_len: int) -> None:
        """Per-request series (gateway, router): latencies, finish reasons, sizes of the requests relayed."""
        model_name, role, name_prefix = self.model_name, self.role, self.prefix
        self.aborts = counter("aborts", "Requests aborted (client cancel, disconnect, deadline).")
        self._request_success = Counter(
            name_prefix + "request_success", "Finished requests, by finish reason.",
            LABELS + ("finished_reason",), registry=self.registry)
        for reason in FINISHED_REASONS:  # so every series exists at 0 from the start
            self._request_success.labels(model_name, role, reason)
        self.time_to_first_token_seconds = histogram(
            "time_to_first_token_seconds", "Time to first token, seconds.", TTFT_BUCKETS)
        self.inter_token_latency_seconds = histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens, seconds.",
            ITL_BUCKETS)
        self.e2e_request_latency_seconds = histogram(
            "e2e_request_latency_seconds", "Arrival to last token, seconds.",
            REQUEST_LATENCY_BUCKETS)
        self.request_queue_time_seconds = histogram(
            "request_queue_time_seconds", "Time waiting before the prompt started, seconds.",
            REQUEST_LATENCY_BUCKETS)
        self.time_per_output_token_seconds = histogram(
            "time_per_output_token_seconds", "Time between consecutive tokens, seconds (vLLM v1's name).",
            ITL_BUCKETS)
        self.request_prefill_time_seconds = histogram(
            "request_prefill_time_seconds", "Time the prefill node spent on the prompt, seconds.",
            REQUEST_LATENCY_BUCKETS)
        self.request_decode_time_seconds = histogram(
            "request_decode_time_seconds", "First token to last token, seconds.", REQUEST_LATENCY_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per completion.", tokens)
        self.request_max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens", "Most tokens generated by one completion of a request.", tokens)

    def request_success(self, finished_reason: str):
        """The counter child for one finish reason ('length', 'stop', 'abort', ...; 'eos' is 'stop')."""
        reason = "stop" if finished_reason == "eos" else finished_reason
        return self._request_success.labels(self.model_name, self.role, reason)

    def observe_completion(self, prompt_tokens: int, generation_tokens: int, timings=None,
                           decode_s: float | None = None) -> None:
        """Per-completion histograms at its end (`timings`: a RequestTimings; decode time from it
        when `decode_s` is not measured here)."""
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        if decode_s is None and timings is not None and timings.e2e_ms > 0:
            decode_s = max(timings.e2e_ms - timings.ttft_ms, 0.0) / 1e3
        if decode_s is not None:
            self.request_decode_time_seconds.observe(decode_s)
        if timings is not None and timings.prefill_ms > 0:
            self.request_prefill_time_seconds.observe(timings.prefill_ms / 1e3)

    def set_cache_config(self, block_size: int, num_gpu_blocks: int) -> None:
        self._cache_config_info.labels(self.model_name, self.role, str(block_size), str(num_gpu_blocks)).set(1)

    def set_load(self, load: dict) -> None:
        """Sets the gauges from an `LLMEngine.load()` dict (missing keys are left alone)."""
        if "num_running" in load:
            self.num_requests_running.set(load["num_running"])
        if "num_waiting" in load:
            self.num_requests_waiting.set(load["num_waiting"])
        if "num_prefilled_held" in load:
            self.active_leases.set(load["num_prefilled_held"])
        free, total = load.get("free_blocks"), load.get("total_blocks")
        if free is not None:
            self.kv_free_blocks.set(free)
        if total is not None:
            self.kv_total_blocks.set(total)
        if free is not None and total:
            self.kv_cache_usage_perc.set(1.0 - free / total)
            self.gpu_cache_usage_perc.set(1.0 - free / total)

    def track(self, arrival: float | None = None) -> "StreamTracker":
        """A tracker for one request relayed by this process (see StreamTracker)."""
        return StreamTracker(self, arrival)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition, for a web route."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def add_metrics_flags(parser) -> None:
    """--metrics-port and --metrics-prefix, as the router and the nodes take them."""
    from engine.cli_args import add_flag

    add_flag(parser, "--metrics-port", type=int, default=None,
             help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    add_flag(parser, "--metrics-prefix", default="pdserve", choices=PREFIXES,
             help="metric name prefix: pdserve (pdserve:...) or vllm (vllm:..., for vLLM's dashboards and autoscaling rules)")


def start_metrics_server(port: int, host: str = "127.0.0.1",
                         registry: CollectorRegistry | Metrics | None = None):
    """Serves `registry` at http://host:port/metrics from a daemon thread, always in the text
    format 0.0.4 (no content negotiation, so no Accept header renames a series).

    Returns (server, bound_port); port 0 picks a free one. Stop with `server.shutdown()`."""
    if isinstance(registry, Metrics):
        registry = registry.registry
    server = ThreadingHTTPServer((host, port), _handler(registry or CollectorRegistry()))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server, server.server_port


def _handler(registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # no access log on stderr
            pass

    return MetricsHandler


_FINISH_ENUM_NAMES = {1: "length", 2: "stop", 3: "stop", 4: "abort", 5: "time_limit", 6: "error"}


class StreamTracker:
    """Request-level metrics of one request whose tokens pass through this process (router, gateway).

        tracker = metrics.track()
        for chunk in stream: tracker.chunk(chunk)   # .index .token_ids .finish_reason .prompt_tokens
        tracker.close(aborted=...)                  #  .completion_tokens [.timings]

    `finish_reason` may be an engine string or a pdserve.v1.FinishReason enum value."""

    def __init__(self, metrics: Metrics, arrival: float | None = None):
        self.m = metrics
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_seen = False
        self.last_token_at: dict[int, float] = {}
        self.first_token_at: dict[tuple[int, int], float] = {}
        self.completion_tokens: dict[tuple[int, int], int] = {}
        self.closed = False
        metrics.num_requests_running.inc()

    def chunk(self, chunk, prompt_index: int | None = None) -> None:
        now = time.monotonic()
        p = getattr(chunk, "prompt_index", 0) if prompt_index is None else prompt_index
        key = (p, chunk.index)
        if chunk.token_ids:
            last = self.last_token_at.get(key)
            if not self.first_token_seen:
                self.first_token_seen = True
                self.m.time_to_first_token_seconds.observe(now - self.arrival)
            elif last is not None:
                self.m.inter_token_latency_seconds.observe(now - last)
                self.m.time_per_output_token_seconds.observe(now - last)
            self.first_token_at.setdefault(key, now)
            self.last_token_at[key] = now
        self.completion_tokens[key] = chunk.completion_tokens
        reason = chunk.finish_reason
        if reason:
            name = _FINISH_ENUM_NAMES.get(reason, "error") if isinstance(reason, int) else str(reason)
            self.m.request_success(name).inc()
            self._finished(key, chunk, now)
            timings = getattr(chunk, "timings", None)
            if timings is not None and timings.queue_ms > 0 and chunk.index == 0:
                self.m.request_queue_time_seconds.observe(timings.queue_ms / 1e3)

    def _finished(self, key: tuple[int, int], chunk, now: float) -> None:
        first = self.first_token_at.get(key)
        self.m.observe_completion(chunk.prompt_tokens, chunk.completion_tokens, getattr(chunk, "timings", None),
                                  None if first is None else now - first)

    def close(self, aborted: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.m.num_requests_running.dec()
        if aborted:
            self.m.aborts.inc()
        else:
            self.m.e2e_request_latency_seconds.observe(time.monotonic() - self.arrival)
            self.m.request_max_num_generation_tokens.observe(max(self.completion_tokens.values(), default=0))


class NodeExporter:
    """Copies a node's state into its metrics: gauges from its NodeLoad, counters from the growth of
    its NodeStats (engine/node/base.py) since the previous update, and from its engine (an
    AsyncEngine) the scheduler's preemptions and the tokens of every step since the last update."""

    COUNTERS = (("aborts", "aborts"), ("kv_transfer_bytes", "kv_transfer_bytes"),
                ("kv_transfer_early_bytes", "kv_transfer_early_bytes"),
                ("kv_transfer_streams", "kv_transfer_streams"),
                ("prompt_tokens", "prompt_tokens"), ("prompt_tokens", "prefix_cache_queries"),
                ("cached_tokens", "prefix_cache_hits"), ("generation_tokens", "generation_tokens"))

    def __init__(self, metrics: Metrics, block_size: int = 0):
        self.m = metrics
        self.last: dict[str, float] = {}
        self.block_size = block_size
        self.cache_config_set = False

    def _growth(self, stats, attr: str) -> float:
        value = getattr(stats, attr, 0)
        grown = value - self.last.get(attr, 0)
        self.last[attr] = value
        return max(grown, 0)

    def update_engine(self, engine) -> None:
        """num_preemptions and iteration_tokens from the node's engine."""
        grown = self._growth(engine, "num_preemptions")
        if grown:
            self.m.num_preemptions.inc(grown)
        for tokens in engine.take_step_tokens():
            self.m.iteration_tokens.observe(tokens)

    def update(self, load, stats, engine=None) -> None:
        m = self.m
        m.set_load({"num_running": load.num_running, "num_waiting": load.num_waiting,
                    "free_blocks": load.free_blocks, "total_blocks": load.total_blocks})
        m.active_leases.set(load.active_leases)
        if self.block_size and load.total_blocks and not self.cache_config_set:
            m.set_cache_config(self.block_size, load.total_blocks)
            self.cache_config_set = True
        grown = {}
        for attr, _ in self.COUNTERS:
            grown.setdefault(attr, self._growth(stats, attr))
        for attr, name in self.COUNTERS:
            if grown[attr]:
                getattr(m, name).inc(grown[attr])
        transfers = self._growth(stats, "kv_transfers")
        seconds = self._growth(stats, "kv_transfer_seconds")
        for _ in range(int(transfers) if seconds > 0 else 0):  # NodeStats keeps sums only: each transfer of the interval
            m.kv_transfer_seconds.observe(seconds / transfers)  # counts at the interval's mean
        if engine is not None:
            self.update_engine(engine)


async def export_node_metrics(servicer, role: str, port: int, host: str = "127.0.0.1",
                              interval_s: float = 1.0, prefix: str = "pdserve") -> None:
    """Serves a node's metrics on host:port and refreshes them every `interval_s` (runs until cancelled).
    `servicer`: a node servicer with `model_name`, `stats` and `async load_proto()`."""
    import asyncio

    metrics = Metrics(servicer.model_name, role, prefix=prefix,
                      max_model_len=getattr(servicer, "max_model_len", None) or DEFAULT_MAX_MODEL_LEN)
    server, _ = start_metrics_server(port, host, metrics)
    exporter = NodeExporter(metrics, block_size=getattr(getattr(servicer, "spec", None), "block_size", 0) or 0)
    try:
        while True:
            try:
                exporter.update(await servicer.load_proto(), servicer.stats, servicer.engine)
            except Exception:  # a failing engine shows in health, not here; keep serving the last values
                pass
            await asyncio.sleep(interval_s)
    finally:
        server.shutdown()
