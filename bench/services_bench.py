"""Services benchmark (CPU is fine):

1. TTFT and per-token time of one streamed request through router + prefill + decode processes
   (gRPC, loopback) vs the in-process engine, on the same tiny model; the difference is what the
   services add.
2. gRPC KV-transfer throughput on loopback with the nodes' own transport (GrpcKVSender ->
   PushKV into KVStaging, CRC32 checked), ~256 MiB in frames of at most 1 MiB.

    python bench/services_bench.py [--model DIR] [--runs 5] [--kv-mib 256]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the printing press begins in the fifteenth century, when " * 4
NEW_TOKENS = 32


def tiny_model_dir() -> str:
    import json

    from engine.default_model import default_model_path
    from engine.loader import load_model_source
    from tests.conftest import build_tiny_model

    path = pathlib.Path(tempfile.mkdtemp(prefix="pdserve-bench-tiny-"))
    build_tiny_model("llama").save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    load_model_source(str(default_model_path())).tokenizer.save_pretrained(path)
    return str(path)


def summarize(ttfts: list[float], tpots: list[float]) -> tuple[float, float]:
    return statistics.median(ttfts) * 1000, statistics.median(tpots) * 1000


def bench_engine(model: str, runs: int) -> tuple[float, float]:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(model, max_model_len=512, num_gpu_blocks=128, dtype="float32", enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ttfts, tpots = [], []
    for i in range(runs + 1):
        start = time.perf_counter()
        engine.add_request(f"r{i}", PROMPT, params)
        first = last = None
        while engine.has_unfinished_requests():
            for _ in engine.step():
                last = time.perf_counter()
                first = first or last
        if i:  # the first run warms up
            ttfts.append(first - start)
            tpots.append((last - first) / (NEW_TOKENS - 1))
    return summarize(ttfts, tpots)


def bench_stack(model: str, runs: int) -> tuple[float, float]:
    from protos.pdserve.v1 import generation_pb2 as g
    from tests.services.stack import start_stack

    with start_stack(model, extra_args=("--no-enable-prefix-caching",)) as stack:
        stub = stack.stub()
        req = g.GenerateRequest(text=PROMPT, sampling=g.SamplingParameters(temperature=0.0),
                                stopping=g.StoppingCriteria(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        ttfts, tpots = [], []
        for i in range(runs + 1):
            start = time.perf_counter()
            first = last = None
            for _ in stub.GenerateStream(req, timeout=120):
                last = time.perf_counter()
                first = first or last
            if i:
                ttfts.append(first - start)
                tpots.append((last - first) / (NEW_TOKENS - 1))
        return summarize(ttfts, tpots)


# ---- KV transfer --------------------------------------------------------------------------------
SPEC = dict(num_layers=8, block_size=16, num_kv_heads=8, head_dim=128)  # fp32: 64 KiB per block per layer


def _spec():
    import torch

    from engine.kv_transfer.base import KVSpec

    return KVSpec(dtype=torch.float32, **SPEC)


async def _receiver(port_file: str) -> None:
    """A PushKV-only DecodeNode: frames go into KVStaging, as on a decode node."""
    from engine.kv_transfer.staging import KVStaging
    from engine.rpc.server import build_server
    from protos.pdserve.v1 import node_pb2, node_pb2_grpc

    spec = _spec()

    class Sink(node_pb2_grpc.DecodeNodeServicer):
        async def PushKV(self, request_iterator, context):
            staging = None
            async for frame in request_iterator:
                if staging is None:  # reservation ids are "res-<num_blocks>-<i>"
                    staging = KVStaging(frame.reservation_id, spec, int(frame.reservation_id.split("-")[1]))
                staging.add_frame(frame)
            return node_pb2.PushKVResponse(bytes_received=staging.bytes_received, frames=staging.frames)

    server = build_server([(node_pb2_grpc.add_DecodeNodeServicer_to_server, Sink())], port=0)
    await server.start()
    pathlib.Path(port_file).write_text(str(server.port))
    await server.wait_for_termination()


def bench_kv(total_mib: int) -> tuple[float, int, float]:
    """-> (GB/s, bytes, seconds) of sending `total_mib` MiB over PushKV on loopback."""
    import torch

    from engine.kv_transfer.grpc_transport import GrpcKVSender
    from protos.pdserve.v1 import node_pb2

    spec = _spec()
    num_blocks = 32  # K + V of 8 layers x 32 blocks x 64 KiB = 32 MiB per transfer
    k = torch.randn(spec.num_layers, num_blocks, *spec.block_shape)
    v = torch.randn_like(k)
    per_transfer = 2 * k.numel() * 4
    transfers = max(1, total_mib * 2**20 // per_transfer)
    port_file = tempfile.mktemp()
    proc = subprocess.Popen([sys.executable, __file__, "--kv-receiver", port_file], cwd=ROOT)
    try:
        while not os.path.exists(port_file) or not pathlib.Path(port_file).read_text():
            time.sleep(0.1)
        address = f"127.0.0.1:{pathlib.Path(port_file).read_text()}"

        async def run() -> float:
            sender = GrpcKVSender()
            target = node_pb2.KVTarget(decode_address=address, layout=spec.to_proto(),
                                       transport=node_pb2.KV_TRANSPORT_GRPC)
            target.reservation_id = f"res-{num_blocks}-warm"
            await sender.send(target, k, v, timeout=60)
            start = time.perf_counter()
            for i in range(transfers):
                target.reservation_id = f"res-{num_blocks}-{i}"
                assert await sender.send(target, k, v, timeout=60) == per_transfer
            elapsed = time.perf_counter() - start
            await sender.close()
            return elapsed

        elapsed = asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(port_file)
    moved = transfers * per_transfer
    return moved / elapsed / 1e9, moved, elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: a tiny random llama)")
    p.add_argument("--runs", type=int, default=5, help="measured requests per setup (after one warm-up)")
    p.add_argument("--kv-mib", type=int, default=256, help="MiB of KV to move in the transfer benchmark")
    p.add_argument("--skip-stack", action="store_true", help="only the KV transfer benchmark")
    p.add_argument("--kv-receiver", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.kv_receiver:
        from engine.rpc.server import run

        run(lambda: _receiver(ns.kv_receiver))
        return 0
    rows = []
    if not ns.skip_stack:
        model = ns.model or tiny_model_dir()
        e_ttft, e_tpot = bench_engine(model, ns.runs)
        s_ttft, s_tpot = bench_stack(model, ns.runs)
        rows += [("in-process engine", f"{e_ttft:.1f}", f"{e_tpot:.2f}"),
                 ("router + prefill + decode (gRPC)", f"{s_ttft:.1f}", f"{s_tpot:.2f}"),
                 ("overhead", f"{s_ttft - e_ttft:+.1f}", f"{s_tpot - e_tpot:+.2f}")]
        print(f"\nprompt {len(PROMPT)} chars, {NEW_TOKENS} new tokens, greedy, median of {ns.runs} runs")
        print(f"{'setup':36s} {'TTFT ms':>10s} {'ms/token':>10s}")
        for row in rows:
            print(f"{row[0]:36s} {row[1]:>10s} {row[2]:>10s}")
    gbps, moved, secs = bench_kv(ns.kv_mib)
    print(f"\ngRPC KV transfer on loopback: {moved / 2**20:.0f} MiB in {secs:.2f} s = {gbps:.2f} GB/s "
          f"(frames <= 1 MiB, CRC32 checked, into KVStaging)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
