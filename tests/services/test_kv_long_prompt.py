"""Timings through the router (first-to-second-token gap, the transport used), and the CPU case of issue 11: `pdserve serve` on the default model, one prompt of 6,000 token ids
through the router's Generate. Its prefill takes far longer than the router's 10 s lease and KV
wait; it used to end UNAVAILABLE ("failed during the KV transfer"). The lease is renewed while the
prompt prefills and by every frame, so it succeeds, and every node is idle and whole afterwards."""
from __future__ import annotations

import pytest

from protos.pdserve.v1 import generation_pb2 as g
from tests.services.helpers import assert_idle
from tests.services.stack import start_stack

PROMPT_TOKENS = 6000
LONG_ARGS = ("--num-gpu-blocks", "512", "--max-model-len", "8192")


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_6000_token_prompt_through_the_router_succeeds(default_model_path):
    ids = [1000 + (i * 7919) % 40_000 for i in range(PROMPT_TOKENS)]
    with start_stack(default_model_path, extra_args=LONG_ARGS) as stack:
        stub = stack.stub()
        resp = stub.Generate(g.GenerateRequest(token_ids=g.TokenIds(ids=ids),
                                               sampling=g.SamplingParameters(temperature=0.0),
                                               stopping=g.StoppingCriteria(max_new_tokens=4, ignore_eos=True)),
                             timeout=2700)
        c = resp.completions[0]
        assert len(c.token_ids) == 4 and c.finish_reason == g.FinishReason.FINISH_REASON_LENGTH
        t = c.timings
        assert t.kv_transport == "grpc" and t.kv_transfer_bytes == 2 * 30 * 375 * 16 * 3 * 64 * 4
        assert t.first_to_second_token_ms > 0
        print(f"prefill {t.prefill_ms / 1000:.1f} s, KV {t.kv_transfer_bytes / 1e6:.0f} MB in {t.kv_transfer_ms:.0f} ms, "
              f"first->second token {t.first_to_second_token_ms:.0f} ms")
        assert_idle(stub)


@pytest.mark.timeout(300)
def test_timings_carry_the_transport_and_the_first_to_second_token_gap(make_tiny_model):
    with start_stack(make_tiny_model("llama")) as stack:
        stub = stack.stub()
        resp = stub.Generate(g.GenerateRequest(token_ids=g.TokenIds(ids=list(range(10, 50))),
                                               sampling=g.SamplingParameters(temperature=0.0),
                                               stopping=g.StoppingCriteria(max_new_tokens=4, ignore_eos=True)),
                             timeout=60)
        t = resp.completions[0].timings
        assert t.kv_transport == "grpc"  # auto on CPU
        assert 0 < t.first_to_second_token_ms < t.e2e_ms and t.kv_transfer_bytes > 0
        one = stub.Generate(g.GenerateRequest(token_ids=g.TokenIds(ids=list(range(10, 50))),
                                              stopping=g.StoppingCriteria(max_new_tokens=1)), timeout=60)
        assert one.completions[0].timings.first_to_second_token_ms == 0  # no second token
        assert_idle(stub)
