"""A stack shared by the structured-output and tool tests (session scope: started once): tiny
random Llama, so only the grammar makes its output well-formed; router + prefill + decode +
gateway on loopback, with the hermes tool-call parser."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.services.stack import start_stack

STACK_ARGS = ("--max-model-len", "512", "--num-gpu-blocks", "160", "--tool-call-parser", "hermes")


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
