"""One prefill and one decode node as real processes on loopback, driven directly with node stubs
(Reserve -> Prefill(target) -> Decode), on both KV transports (gRPC frames and torch.distributed,
gloo on CPU), checked against the offline engine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.rpc import convert
from engine.rpc.channel import sync_channel
from engine.rpc.process import spawn_env
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2, node_pb2, node_pb2_grpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE_ARGS = ("--num-gpu-blocks", "64", "--max-model-len", "256", "--max-num-seqs", "8", "--dtype", "float32",
             "--device", "cpu", "--shutdown-grace", "2", "--kv-grpc-lanes", "2")  # gRPC KV over two lanes
TRANSPORTS = {"grpc": node_pb2.KV_TRANSPORT_GRPC, "torch_dist": node_pb2.KV_TRANSPORT_NCCL}
PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
           "A long time ago in a galaxy far, far away, there lived a"]
FR = generation_pb2.FinishReason


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    role: str
    proc: subprocess.Popen
    address: str
    health_seen: list[int] = field(default_factory=list)  # health statuses observed during startup
    stderr: list[str] = field(default_factory=list)

    def channel(self) -> grpc.Channel:
        return sync_channel(self.address)

    def load(self) -> generation_pb2.NodeLoad:
        with self.channel() as ch:
            stub = (node_pb2_grpc.DecodeNodeStub if self.role == "decode" else node_pb2_grpc.PrefillNodeStub)(ch)
            return stub.GetLoad(node_pb2.NodeLoadRequest(), timeout=5)

    def health(self) -> int:
        with self.channel() as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status

    def wait_idle(self, timeout: float = 10.0) -> generation_pb2.NodeLoad:
        """Polls GetLoad until the node holds nothing: no request id, free == total blocks."""
        end = time.monotonic() + timeout
        while True:
            load = self.load()
            if not load.request_ids and load.free_blocks == load.total_blocks and load.active_leases == 0:
                return load
            if time.monotonic() > end:
                return load
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_node(role: str, model: str, *extra: str, env: dict | None = None, timeout: float = 120.0,
               launcher: list[str] | None = None) -> Node:
    """Starts `python -m <role>_node` (or `python <launcher>`) on a free loopback port; watches
    health until READY."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *(launcher or ["-m", f"{role}_node"]), "--model", str(model), "--port", str(port),
         *NODE_ARGS, *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,  # the node arms its own pdeathsig
        env=spawn_env({**os.environ, "PYTHONPATH": REPO, **(env or {})}))
    node = Node(role, proc, f"127.0.0.1:{port}")
    threading.Thread(target=lambda: node.stderr.extend(proc.stderr), daemon=True).start()
    ready = threading.Event()
    lines: list[str] = []

    def read_stdout():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY "):
                ready.set()
    threading.Thread(target=read_stdout, daemon=True).start()
    end = time.monotonic() + timeout
    while not ready.is_set():
        if proc.poll() is not None or time.monotonic() > end:
            node.stop()
            raise RuntimeError(f"{role} node did not start: {''.join(node.stderr)[-2000:]}")
        try:
            status = node.health()
            if not node.health_seen or node.health_seen[-1] != status:
                node.health_seen.append(status)
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    assert lines[-1].strip() == f"READY {node.address}"
    node.health_seen.append(node.health())
    return node



@pytest.fixture(scope="module")
def offline(model_dir):
    from engine.llm import LLM
    return LLM(str(model_dir), num_gpu_blocks=64, max_model_len=256, dtype="float32", device="cpu")


@dataclass
class Result:
    token_ids: list[int]
    finish_reason: int
    events: list[str]  # "first", "transfer", "decode" in arrival order
    transfer_bytes: int = 0


def generate(prefill: Node, decode: Node, request_id: str, prompt_ids: list[int], params: SamplingParams,
             transport: int, max_events: int | None = None) -> Result:
    """Reserve -> Prefill(target) -> Decode, as the router does it."""
    resolved = convert.params_to_proto(params)
    with prefill.channel() as pch, decode.channel() as dch:
        p = node_pb2_grpc.PrefillNodeStub(pch)
        d = node_pb2_grpc.DecodeNodeStub(dch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id=request_id, num_prompt_tokens=len(prompt_ids),
                                                lease_ms=20_000, transport=transport), timeout=10)
        target = node_pb2.KVTarget(decode_address=decode.address, reservation_id=res.reservation_id,
                                   transport=transport, rendezvous=res.rendezvous, decode_node_id=res.node_id,
                                   layout=res.layout, kv_lanes=res.kv_lanes)  # gRPC: NODE_ARGS' 2 lanes
        events, first = [], None
        transfer_bytes = 0
        for ev in p.Prefill(node_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                                    params=resolved, target=target), timeout=30):
            if ev.HasField("first_token"):
                events.append("first")
                first = ev.first_token
            else:
                events.append("transfer")
                transfer_bytes = ev.transfer_done.bytes
        tokens = [first.token_id]
        if first.finish_reason != FR.FINISH_REASON_UNSPECIFIED:
            d.Abort(node_pb2.NodeAbortRequest(request_id=request_id), timeout=5)
            return Result(tokens, first.finish_reason, events)
        reason = FR.FINISH_REASON_UNSPECIFIED
        for ev in d.Decode(node_pb2.DecodeRequest(request_id=request_id, reservation_id=res.reservation_id,
                                                  prompt_token_ids=prompt_ids, first_token_id=first.token_id,
                                                  params=resolved, kv_wait_ms=10_000), timeout=60):
            events.append("decode")
            tokens.extend(ev.token_ids)
            reason = ev.finish_reason
        return Result(tokens, reason, events, transfer_bytes)


@pytest.mark.timeout(300)
def test_health_not_serving_until_loaded(nodes):
    for node in nodes:
        assert node.health_seen[-1] == health_pb2.HealthCheckResponse.SERVING
        # the port opens before the model is loaded; health says NOT_SERVING until the probe worked
        assert health_pb2.HealthCheckResponse.NOT_SERVING in node.health_seen, node.health_seen


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_greedy_output_equals_offline(nodes, offline, transport):
    prefill, decode = nodes
    tok = offline.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        want = offline.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0].token_ids
        got = generate(prefill, decode, f"{transport}-{i}", ids, params, TRANSPORTS[transport])
        assert got.token_ids == want, (prompt, transport)
        assert got.finish_reason == FR.FINISH_REASON_LENGTH
        # the first token is streamed before any KV moves
        assert got.events[:2] == ["first", "transfer"] and set(got.events[2:]) == {"decode"}
        blocks = -(-len(ids) // 16)
        assert got.transfer_bytes == 2 * 2 * blocks * 16 * 2 * 16 * 4  # K+V, layers, blocks, tokens, heads, dim, fp32
    for node in nodes:
        load = node.wait_idle()
        assert load.free_blocks == load.total_blocks and not load.request_ids


@pytest.mark.timeout(300)
def test_batched_decoding_equals_offline(nodes, offline):
    """Several requests decode at once on the decode node (continuous batching), outputs unchanged."""
    from concurrent.futures import ThreadPoolExecutor
    prefill, decode = nodes
    tok = offline.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = [tok.encode(p) for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in offline.generate([{"prompt_token_ids": x} for x in ids], params,
                                                             use_tqdm=False)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: generate(prefill, decode, f"batch-{a[0]}", a[1], params,
                                               TRANSPORTS["grpc" if a[0] % 2 else "torch_dist"]), enumerate(ids)))
    assert [g.token_ids for g in got] == want
    assert decode.wait_idle().free_blocks == decode.load().total_blocks


@pytest.mark.timeout(300)
def test_first_token_finishing_the_request_skips_the_transfer(nodes, offline):
    prefill, decode = nodes
    ids = offline.get_tokenizer().encode(PROMPTS[0])
    got = generate(prefill, decode, "one-token", ids, SamplingParams(temperature=0, max_tokens=1),
                   TRANSPORTS["grpc"])
    assert got.events == ["first"] and got.finish_reason == FR.FINISH_REASON_LENGTH
    for node in nodes:
        load = node.wait_idle()
        assert load.free_blocks == load.total_blocks and not load.request_ids


@pytest.mark.timeout(300)
def test_cancel_decode_stream_frees_everything(nodes, offline):
    prefill, decode = nodes
    ids = offline.get_tokenizer().encode(PROMPTS[1])
    params = convert.params_to_proto(SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    with prefill.channel() as pch, decode.channel() as dch:
        d = node_pb2_grpc.DecodeNodeStub(dch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id="cancel-me", num_prompt_tokens=len(ids), lease_ms=20_000),
                        timeout=10)
        target = node_pb2.KVTarget(decode_address=decode.address, reservation_id=res.reservation_id,
                                   transport=node_pb2.KV_TRANSPORT_GRPC, layout=res.layout)
        events = list(node_pb2_grpc.PrefillNodeStub(pch).Prefill(node_pb2.PrefillRequest(
            request_id="cancel-me", prompt_token_ids=ids, params=params, target=target), timeout=30))
        stream = d.Decode(node_pb2.DecodeRequest(request_id="cancel-me", reservation_id=res.reservation_id,
                                                 prompt_token_ids=ids, first_token_id=events[0].first_token.token_id,
                                                 params=params), timeout=60)
        got = [next(stream) for _ in range(3)]
        assert all(len(ev.token_ids) == 1 for ev in got)
        assert "cancel-me" in decode.load().request_ids
        stream.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    load = decode.wait_idle()
    assert load.free_blocks == load.total_blocks and "cancel-me" not in load.request_ids


@pytest.mark.timeout(300)
def test_reservation_without_kv_is_freed_when_its_lease_ends(nodes):
    _, decode = nodes
    with decode.channel() as ch:
        d = node_pb2_grpc.DecodeNodeStub(ch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id="orphan", num_prompt_tokens=40, lease_ms=400), timeout=5)
        assert res.num_blocks == 3
        load = decode.load()
        assert "orphan" in load.request_ids and load.active_leases == 1
        assert load.free_blocks == load.total_blocks - 3
        time.sleep(0.6)
        load = decode.load()
        assert "orphan" not in load.request_ids and load.free_blocks == load.total_blocks
        with pytest.raises(grpc.RpcError) as err:  # the expired reservation cannot be decoded from
            list(d.Decode(node_pb2.DecodeRequest(request_id="orphan", reservation_id=res.reservation_id,
                                                 prompt_token_ids=[1] * 40, first_token_id=5), timeout=5))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(300)
def test_decode_without_kv_fails_unavailable_and_frees(nodes):
    _, decode = nodes
    with decode.channel() as ch:
        d = node_pb2_grpc.DecodeNodeStub(ch)
        res = d.Reserve(node_pb2.ReserveRequest(request_id="no-kv", num_prompt_tokens=20, lease_ms=10_000), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            list(d.Decode(node_pb2.DecodeRequest(request_id="no-kv", reservation_id=res.reservation_id,
                                                 prompt_token_ids=[1] * 20, first_token_id=5, kv_wait_ms=300,
                                                 params=convert.params_to_proto(SamplingParams())),
                          timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    load = decode.wait_idle()
    assert load.free_blocks == load.total_blocks and not load.request_ids


@pytest.mark.timeout(300)
def test_reserve_admission_resource_exhausted(nodes):
    _, decode = nodes
    with decode.channel() as ch:
        d = node_pb2_grpc.DecodeNodeStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            d.Reserve(node_pb2.ReserveRequest(request_id="too-long", num_prompt_tokens=256, lease_ms=1000), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "256" in err.value.details()
        # 63 blocks of 16 tokens: 4 reservations of 240 tokens (15 blocks) fit, the 5th does not
        held = [d.Reserve(node_pb2.ReserveRequest(request_id=f"fill-{i}", num_prompt_tokens=240, lease_ms=5000),
                          timeout=5) for i in range(4)]
        with pytest.raises(grpc.RpcError) as err:
            d.Reserve(node_pb2.ReserveRequest(request_id="fill-4", num_prompt_tokens=240, lease_ms=5000), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "need 15" in err.value.details() and "3 of 63 free" in err.value.details()
        for i in range(4):
            assert d.Abort(node_pb2.NodeAbortRequest(request_id=f"fill-{i}"), timeout=5).found
        assert len(held) == 4
    load = decode.wait_idle()
    assert load.free_blocks == load.total_blocks and not load.request_ids
