"""Shared pieces of the router service tests: offline reference outputs and leak checks."""
from __future__ import annotations

import time

from protos.pdserve.v1 import generation_pb2 as g

ENGINE_KW = dict(max_model_len=256, num_gpu_blocks=64, dtype="float32", max_num_seqs=16)


def prompts(tokenizer, count: int = 16) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven hungry cats watch it".split()
    return [" ".join(words[(i * 3) % len(words):] + words[: (i * 5) % 11 + 1]) * (1 + i % 3) for i in range(count)]


def greedy_request(text: str, max_tokens: int, **kw) -> g.GenerateRequest:
    return g.GenerateRequest(text=text, sampling=g.SamplingParameters(temperature=0.0),
                             stopping=g.StoppingCriteria(max_new_tokens=max_tokens), **kw)


def stream_greedy(stub, text: str, max_tokens: int):
    """One greedy GenerateStream: (token ids, concatenated text, last chunk)."""
    ids, pieces, last = [], [], None
    for chunk in stub.GenerateStream(greedy_request(text, max_tokens), timeout=60):
        ids += chunk.token_ids
        pieces.append(chunk.text)
        last = chunk
    return ids, "".join(pieces), last


def wait_idle(stub, timeout: float = 15.0) -> g.GetLoadsResponse:
    """Polls GetLoads until every node is idle (I1: free == total, I2: no request id anywhere)."""
    deadline = time.monotonic() + timeout
    while True:
        loads = stub.GetLoads(g.GetLoadsRequest(), timeout=5)
        live = [n for n in loads.nodes if n.healthy]
        idle = (not loads.router_request_ids
                and all(n.load.free_blocks == n.load.total_blocks and not n.load.request_ids
                        and n.load.active_leases == 0 for n in live))
        if idle or time.monotonic() > deadline:
            return loads


def assert_idle(stub, timeout: float = 15.0) -> None:
    loads = wait_idle(stub, timeout)
    assert not loads.router_request_ids, loads.router_request_ids
    for n in loads.nodes:
        if n.healthy:
            assert n.load.free_blocks == n.load.total_blocks, (n.node_id, n.load)
            assert not n.load.request_ids, (n.node_id, list(n.load.request_ids))
            assert n.load.active_leases == 0, (n.node_id, n.load)
