"""Tensor parallelism through a served stack (`pdserve serve`, CPU, gloo): prefill and decode
nodes of different TP sizes give the colocated TP=1 output, and a rank killed mid-stream takes
its node down cleanly. Each stack starts 3-4 Python processes plus the TP ranks: marked slow."""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pdserve.v1 import generation_pb2 as g
from tests.services.helpers import ENGINE_KW, assert_idle, greedy_request, prompts
from tests.services.stack import pid_alive, start_stack

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    return make_tiny_model("qwen2")  # 4 query / 2 KV heads, qkv bias


@pytest.fixture(scope="module")
def reference(tiny):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(str(tiny), **ENGINE_KW)
    texts = prompts(llm.get_tokenizer(), count=6)
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return texts, [list(o.outputs[0].token_ids) for o in outs]


def _tp_stack(tiny, prefill_tp: int, decode_tp: int):
    return start_stack(tiny, extra_args=["--prefill-tensor-parallel-size", str(prefill_tp),
                                         "--decode-tensor-parallel-size", str(decode_tp)])


def _check_parity(stack, reference) -> None:
    texts, expected = reference
    stub = stack.stub()
    for text, ids in zip(texts, expected):
        c = stub.Generate(greedy_request(text, MAX_TOKENS), timeout=60).completions[0]
        assert list(c.token_ids) == ids
        if c.completion_tokens > 1:
            assert c.timings.kv_transfer_bytes > 0  # it went through the prefill node
    assert_idle(stub)


def _rank_pids(node_pid: int) -> list[int]:
    """The tensor-parallel rank processes a node spawned (children running engine.parallel.worker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == node_pid and b"engine.parallel.worker" in cmd:
            pids.append(int(entry))
    return pids


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_prefill_tp2_to_decode_tp1_matches_colocated(tiny, reference):
    with _tp_stack(tiny, 2, 1) as stack:
        assert len(_rank_pids(stack.processes["prefill-0"])) == 1
        _check_parity(stack, reference)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_prefill_tp1_to_decode_tp2_matches_colocated_and_a_dead_rank_ends_the_node(tiny, reference):
    with _tp_stack(tiny, 1, 2) as stack:
        node_pid = stack.processes["decode-0"]
        ranks = _rank_pids(node_pid)
        assert len(ranks) == 1
        _check_parity(stack, reference)

        # A long stream; one rank of its decode node is killed once tokens flow.
        stub = stack.stub()
        request = g.GenerateRequest(text=reference[0][0], sampling=g.SamplingParameters(temperature=0.0),
                                    stopping=g.StoppingCriteria(max_new_tokens=200, ignore_eos=True))
        got: dict = {"tokens": 0}
        flowing = threading.Event()

        def consume():
            try:
                for chunk in stub.GenerateStream(request, timeout=60):
                    got["tokens"] += len(chunk.token_ids)
                    if got["tokens"] >= 3:
                        flowing.set()
                    got["finish"] = chunk.finish_reason
            except grpc.RpcError as exc:
                got["code"] = exc.code()
            flowing.set()

        thread = threading.Thread(target=consume)
        thread.start()
        assert flowing.wait(60)
        os.kill(ranks[0], signal.SIGKILL)
        thread.join(60)
        assert got.get("code") == grpc.StatusCode.UNAVAILABLE, got
        assert got["tokens"] < 200

        deadline = time.monotonic() + 20
        statuses = []
        with grpc.insecure_channel(stack.node_addresses["decode-0"]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and pid_alive(node_pid):
                try:
                    statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
                except grpc.RpcError:
                    pass  # already gone
                time.sleep(0.05)
        assert not statuses or statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, statuses
        assert not pid_alive(node_pid), "the decode node outlived its dead rank"
        assert not any(pid_alive(p) for p in ranks)
