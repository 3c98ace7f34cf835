"""A prompt of several prefill chunks sends its KV over gRPC chunk by chunk (issue 11 item 3): the
prefill node hands each finished block range to the transfer while later chunks are still being
computed, over two lanes (concurrent PushKV streams, one per layer here; `pdserve serve` forwards
the flag and the router the decode node's `kv_lanes`), and the output stays token-identical to the
in-process engine."""
from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from protos.pdserve.v1 import generation_pb2 as g
from tests.services.helpers import ENGINE_KW, assert_idle
from tests.services.stack import start_stack

CHUNK = 16  # tokens per prefill step: one block
MAX_TOKENS = 8


def _free_port_pair() -> int:
    """A port P with P + 1 and P + 2 free too (router, prefill-0, decode-0 metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ok = True
        for p in (port + 1, port + 2):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port triple")


def _counter(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.timeout(300)
def test_long_prompt_kv_streams_chunk_by_chunk_and_output_is_identical(make_tiny_model):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    model = make_tiny_model("llama")
    prompts = [[10 + (i * 37 + j * 11) % 400 for j in range(150 + 7 * i)] for i in range(3)]  # 10-11 blocks
    llm = LLM(str(model), **ENGINE_KW)
    expected = [list(o.outputs[0].token_ids) for o in
                llm.generate([{"prompt_token_ids": p} for p in prompts],
                             SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)]
    del llm
    port = _free_port_pair()
    args = ("--max-num-batched-tokens", str(CHUNK), "--kv-stream-chunks", "--kv-grpc-lanes", "2",  # each chunk over 2 lanes
            "--metrics-port", str(port))
    with start_stack(model, extra_args=args) as stack:
        stub = stack.stub()
        for ids, want in zip(prompts, expected):
            c = stub.Generate(g.GenerateRequest(token_ids=g.TokenIds(ids=ids), sampling=g.SamplingParameters(temperature=0.0),
                                                stopping=g.StoppingCriteria(max_new_tokens=MAX_TOKENS, ignore_eos=True)),
                              timeout=120).completions[0]
            assert list(c.token_ids) == want
            assert c.timings.kv_transport == "grpc" and c.timings.kv_transfer_bytes > 0
        short = stub.Generate(g.GenerateRequest(token_ids=g.TokenIds(ids=list(range(10, 20))),
                                                sampling=g.SamplingParameters(temperature=0.0),
                                                stopping=g.StoppingCriteria(max_new_tokens=2)), timeout=60)
        assert len(short.completions[0].token_ids) == 2  # one chunk: the whole-transfer path
        time.sleep(1.5)  # nodes refresh their metrics every second
        early = _counter(port + 1, "pdserve:kv_transfer_early_bytes_total")
        total = _counter(port + 1, "pdserve:kv_transfer_bytes_total")
        assert 0 < early < total  # most of each long prompt's KV left before its last chunk was computed
        assert _counter(port + 2, "pdserve:kv_transfer_early_bytes_total") == 0  # counted by the sender only
        assert _counter(port + 2, "pdserve:kv_transfer_streams_total") == 2 * (len(prompts) + 1)  # two lanes each
        assert_idle(stub)
