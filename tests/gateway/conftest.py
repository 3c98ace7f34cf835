"""A stack shared by the structured-output and tool tests (session scope: started once): tiny
random Llama, so only the grammar makes its output well-formed; router + prefill + decode +
gateway on loopback, with the hermes tool-call parser and vLLM's metric names on every port
(router on METRICS_PORT, prefill-0 on +1, decode-0 on +2, the gateway on its own /metrics)."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.services.stack import free_port, start_stack

METRICS_PORT = free_port()
STACK_ARGS = ("--max-model-len", "512", "--num-gpu-blocks", "160", "--tool-call-parser", "hermes",
              "--metrics-prefix", "vllm", "--metrics-port", str(METRICS_PORT))


@pytest.fixture(scope="session")
def structured_stack(make_tiny_model):
    with start_stack(make_tiny_model("llama"), gateway=True, extra_args=STACK_ARGS) as s:
        assert s.gateway_url, "".join(s.output[-40:])
        yield s


@pytest.fixture(scope="session")
def stack_http(structured_stack):
    with httpx.Client(base_url=structured_stack.gateway_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def stack_model(stack_http) -> str:
    return stack_http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="session")
def stack_sdk(structured_stack):
    return openai.OpenAI(base_url=structured_stack.gateway_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def metrics_urls(structured_stack) -> dict[str, str]:
    ports = {"router": METRICS_PORT, "prefill": METRICS_PORT + 1, "decode": METRICS_PORT + 2}
    urls = {role: f"http://127.0.0.1:{port}/metrics" for role, port in ports.items()}
    urls["gateway"] = structured_stack.gateway_url + "/metrics"
    return urls
