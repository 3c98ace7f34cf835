"""The router's placement (issue: a router that earns the split), with real processes on loopback
(the policies in process: tests/router/test_placement.py): prefix-aware placement caches more prompt tokens than
least-load on a shared-prefix workload (outputs unchanged); a short follow-up turn is prefilled by
the decode node that holds the conversation (no transfer); kill -9 of a decode node mid-stream
moves its streams to another decode node with identical output; RouterControl.Drain stops
placement on a node at once, lets its streams finish, and the node exits.
"""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import router_pb2, router_pb2_grpc
from tests.services.helpers import ENGINE_KW, assert_idle
from tests.services.stack import free_port, pid_alive, port_open, start_stack

BS = 16
NODE_KEY = "placement-test-node-key"
NODE_AUTH = (("authorization", f"Bearer {NODE_KEY}"),)


# ---- real processes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def llm(tiny):
    from engine.llm import LLM

    return LLM(str(tiny), **ENGINE_KW)


def _reference(llm, prompt_ids, max_tokens, **sampling):
    from engine.sampling_params import SamplingParams

    params = SamplingParams(**{"temperature": 0.0, **sampling}, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([list(p) for p in prompt_ids], params, use_tqdm=False)]


def _ids_request(ids, max_tokens, **kw) -> g.GenerateRequest:
    return g.GenerateRequest(token_ids=g.TokenIds(ids=list(ids)), sampling=g.SamplingParameters(temperature=0.0),
                             stopping=g.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True), **kw)


def _shared_prefix_prompts(vocab: int):
    systems = [[(37 * s + 11 * i) % (vocab - 10) + 5 for i in range(3 * BS)] for s in range(4)]
    return systems, [sys + [(7 * q + 3) % (vocab - 10) + 5, 4 + q] for sys in systems for q in range(4)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prefix_aware_placement_caches_more_than_least_load(tiny, llm):
    systems, prompts = _shared_prefix_prompts(llm.engine.shape.vocab_size)
    expected = _reference(llm, prompts, 4)
    cached = {}
    for policy in ("least-load", "prefix"):
        with start_stack(tiny, num_prefill=2, num_decode=2,
                         extra_args=("--prefill-policy", policy, "--decode-policy", "least-load")) as stack:
            stub = stack.stub()
            for sys in systems:  # one request per system prompt warms one prefill node's cache
                stub.Generate(_ids_request(sys + [5], 2), timeout=60)
            time.sleep(1.0)  # the nodes report their prefix hashes; the router polls them
            with ThreadPoolExecutor(16) as pool:
                replies = list(pool.map(lambda p: stub.Generate(_ids_request(p, 4), timeout=60), prompts))
            outs = [list(r.completions[0].token_ids) for r in replies]
            assert outs == expected, policy  # placement never changes the output
            cached[policy] = sum(r.completions[0].cached_tokens for r in replies)
            assert_idle(stub)
    assert cached["prefix"] >= 3 * BS * len(prompts) * 0.9, cached  # (almost) every system prompt hit
    assert cached["prefix"] > cached["least-load"], cached


@pytest.fixture(scope="module")
def stack(tiny):
    metrics_port = free_port()
    with start_stack(tiny, num_prefill=1, num_decode=3,
                     extra_args=("--local-prefill-tokens", "24", "--node-key", NODE_KEY,
                                 "--metrics-port", str(metrics_port))) as s:
        s.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield s


def _router_counter(stack, name: str) -> float:
    """A placement counter from the router's Prometheus endpoint (summed over its labels)."""
    import urllib.request

    text = urllib.request.urlopen(stack.metrics_url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"pdserve:{name}_total"))


@pytest.mark.timeout(240)
def test_short_follow_up_turn_is_prefilled_by_the_decode_node(stack, llm):
    stub = stack.stub()
    vocab = llm.engine.shape.vocab_size
    turn1 = [(13 * i) % (vocab - 10) + 5 for i in range(5 * BS)]
    first = stub.Generate(_ids_request(turn1, 2 * BS), timeout=60).completions[0]
    assert first.timings.prefill_node == "prefill-0" and first.timings.kv_transfer_bytes > 0  # 80 tokens: P/D
    time.sleep(1.0)  # the decode node reports the conversation's blocks
    turn2 = turn1 + list(first.token_ids) + [7, 8, 9, 10, 11]  # the whole history + a short new message
    second = stub.Generate(_ids_request(turn2, 8), timeout=60).completions[0]
    assert second.timings.decode_node == second.timings.prefill_node == first.timings.decode_node
    assert second.timings.kv_transfer_bytes == 0 and second.cached_tokens >= len(turn1)
    assert list(second.token_ids) == _reference(llm, [turn2], 8)[0]
    assert _router_counter(stack, "placement_prefills_skipped") == 1
    assert _router_counter(stack, "placement_cached_tokens") >= len(turn1)
    assert_idle(stub)


def _stream_all(stub, request, got: list, tokens_seen: threading.Event | None = None):
    last = None
    for chunk in stub.GenerateStream(request, timeout=120):
        got.extend(chunk.token_ids)
        last = chunk
        if tokens_seen is not None and len(got) >= 3:
            tokens_seen.set()
    return last


@pytest.mark.timeout(300)
def test_decode_killed_mid_stream_streams_move_with_identical_output(stack, llm):
    stub = stack.stub()
    vocab = llm.engine.shape.vocab_size
    prompts = [[(17 * i + 5 * k) % (vocab - 10) + 5 for i in range(20 + k)] for k in range(8)]
    max_tokens = 120
    expected = _reference(llm, prompts[:7], max_tokens)
    expected += _reference(llm, prompts[7:], max_tokens, **{"temperature": 1.0, "seed": 7})  # a seeded stream
    requests = [_ids_request(p, max_tokens) for p in prompts[:7]]
    requests.append(g.GenerateRequest(token_ids=g.TokenIds(ids=prompts[7]),
                                      sampling=g.SamplingParameters(temperature=1.0, seed=7),
                                      stopping=g.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True)))
    got = [[] for _ in requests]
    seen = [threading.Event() for _ in requests]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_stream_all, stub, r, got[i], seen[i]) for i, r in enumerate(requests)]
        assert all(e.wait(60) for e in seen)
        loads = {n.node_id: n for n in stub.GetLoads(g.GetLoadsRequest(), timeout=5).nodes}
        on_victim = len(loads["decode-0"].load.request_ids)
        stack.kill("decode-0", signal.SIGKILL)
        finals = [f.result(timeout=120) for f in futures]
    assert on_victim > 0, "no stream was on the killed node: the test proved nothing"
    for out, want, final in zip(got, expected, finals):
        assert out == list(want)  # no duplicate, no missing token
        assert final.finish_reason == g.FinishReason.FINISH_REASON_LENGTH
        assert final.timings.decode_node != "decode-0"
    assert _router_counter(stack, "placement_failovers") >= on_victim
    assert_idle(stub)


@pytest.mark.timeout(240)
def test_drain_stops_placement_and_lets_streams_finish(stack, llm):
    stub = stack.stub()
    vocab = llm.engine.shape.vocab_size
    prompts = [[(23 * i + k) % (vocab - 10) + 5 for i in range(30)] for k in range(6)]
    expected = _reference(llm, prompts, 80)
    got = [[] for _ in prompts]
    seen = [threading.Event() for _ in prompts]
    control = router_pb2_grpc.RouterControlStub(stack.channel())
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_stream_all, stub, _ids_request(p, 80), got[i], seen[i]) for i, p in enumerate(prompts)]
        assert all(e.wait(60) for e in seen)
        reply = control.Drain(router_pb2.DrainNodeRequest(node_id="decode-1"), timeout=10, metadata=NODE_AUTH)
        assert reply.acknowledged
        after = stub.Generate(_ids_request(prompts[0], 4), timeout=60).completions[0]
        assert after.timings.decode_node != "decode-1"  # placement stopped at once
        finals = [f.result(timeout=120) for f in futures]
    assert [list(e) for e in expected] == got and all(f.finish_reason for f in finals)  # nothing lost
    deadline = time.monotonic() + 30
    while pid_alive(stack.processes["decode-1"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(stack.processes["decode-1"]) and not port_open(stack.node_addresses["decode-1"])
    with pytest.raises(grpc.RpcError) as err:
        control.Drain(router_pb2.DrainNodeRequest(node_id="decode-9"), timeout=10, metadata=NODE_AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # a control call needs the node credential
        control.Drain(router_pb2.DrainNodeRequest(node_id="decode-2"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_idle(stub)
