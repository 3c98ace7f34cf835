"""KV transfer between a real prefill and a real decode node on one machine: correctness and speed.

    python bench/kv_transfer_bench.py --out OUT/kv_transfer.json [--sizes 1024,4096,7168] [--frames-mib 1,4,8]
    python bench/kv_transfer_bench.py --tiny --out /tmp/kv.json     # the same code on CPU (grpc only), ~1 min
    python bench/kv_transfer_bench.py --cpu-wide --sizes 2048 --sections raw --lanes 1,2,4   # CPU, 64 KiB/token KV

1. equality: a tiny fp32 model and the Llama-3-8B shape in bf16 (random weights, see gpu_speed.py):
   greedy output through the nodes over each transport (ipc, grpc; nccl needs two GPUs) must equal
   the in-process engine's, token for token.
2. node path: one prompt of each size through Reserve -> Prefill(target) -> Decode on the 8B-shape
   nodes; TransferDone.ms is the prefill node's wall time of the transfer (ipc: RenewLease, the
   device scatter, CommitKV; grpc: D2H, frames, the decode side's CRC + copies + write_blocks).
3. transport only: the bench process sends random KV of each size to the decode node's reservation
   with each sender (grpc at 1/4/8 MiB frames over each of --lanes lane counts, ipc), median of
   --repeats after one warm-up.

Prints a table last; writes {"device", "date", "command", "metrics", "details"} to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import pathlib
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_speed import LLAMA3_8B, TINY, build_hf_model, save_model_dir  # noqa: E402

# CPU: a KV as deep and wide as a real model's per layer (16 layers x 8 KV heads x 64, fp32: 64 KiB per token)
WIDE = dict(TINY, hidden_size=512, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8,
            head_dim=64, intermediate_size=256)

from engine.kv_transfer import TRANSPORTS, GrpcKVSender, IpcKVSender, KVSpec, transport_name  # noqa: E402
from engine.kv_transfer.grpc_transport import Channels  # noqa: E402
from engine.rpc import convert  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from protos.pdserve.v1 import node_pb2, node_pb2_grpc  # noqa: E402

T0 = time.perf_counter()
GOAL_IPC_MS_7K = 10.0
GOAL_GRPC_GBS = 1.5


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProc:
    def __init__(self, role: str, model_dir: pathlib.Path, args: list[str], log_dir: pathlib.Path):
        self.role = role
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = log_dir / f"{role}_{model_dir.name}.log"
        argv = [sys.executable, "-m", f"{role}_node", "--model", str(model_dir), "--port",
                self.address.rsplit(":", 1)[1], "--node-id", f"{role}-bench", *args]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.log_path, "w"),
                                     text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                         p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.ready.set()
        self.ready.set()

    def wait(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"{self.role} node did not start:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def node_args(ns, shape: dict, dtype: str, device: str, lanes: int = 0) -> list[str]:
    max_len = max(ns.sizes) + 64
    blocks = 2 * (-(-max_len // 16)) + 64
    budget = ns.chunk_tokens or max_len  # a prompt longer than the budget prefills (and streams its KV) in chunks
    return ["--device", device, "--dtype", dtype, "--max-model-len", str(max_len), "--num-gpu-blocks", str(blocks),
            "--max-num-seqs", "8", "--max-num-batched-tokens", str(budget), "--kv-transport", "auto",
            "--shutdown-grace", "2", "--no-enable-prefix-caching",  # each transport's run recomputes every prompt
            *(["--kv-stream-chunks"] if ns.chunk_tokens else []),
            *(["--kv-grpc-lanes", str(lanes)] if lanes else [])]


# ---- one request through the nodes ----------------------------------------------------------------
async def generate(prefill, decode, rid: str, ids: list[int], max_tokens: int, transport: int, timing=None):
    """Reserve -> Prefill(target) -> Decode as the router does it; returns (tokens, TransferDone).
    `timing` (a dict) gets prefill_ms (the first token's) and after_first_ms: from the first token's
    arrival to TransferDone's, which is what a client waits between its first and second token."""
    params = convert.params_to_proto(SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    d, p = decode["stub"], prefill["stub"]
    res = await d.Reserve(node_pb2.ReserveRequest(request_id=rid, num_prompt_tokens=len(ids), lease_ms=30_000,
                                                  transport=transport), timeout=30)
    target = node_pb2.KVTarget(decode_address=decode["address"], reservation_id=res.reservation_id,
                               transport=transport, rendezvous=res.rendezvous, decode_node_id=res.node_id,
                               layout=res.layout, kv_lanes=res.kv_lanes)
    first, done, t_first = None, None, None
    async for ev in p.Prefill(node_pb2.PrefillRequest(request_id=rid, prompt_token_ids=ids, params=params,
                                                      target=target), timeout=120):
        if ev.HasField("first_token"):
            first, t_first = ev.first_token, time.perf_counter()
        else:
            done = ev.transfer_done
    if timing is not None:
        timing.update(prefill_ms=first.prefill_ms, after_first_ms=(time.perf_counter() - t_first) * 1000.0)
    tokens = [first.token_id]
    async for ev in d.Decode(node_pb2.DecodeRequest(request_id=rid, reservation_id=res.reservation_id,
                                                    prompt_token_ids=ids, first_token_id=first.token_id,
                                                    params=params, kv_wait_ms=30_000), timeout=120):
        tokens.extend(ev.token_ids)
    return tokens, done


def prompts_for(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (n,), generator=g).tolist() for n in lengths]


def offline_outputs(model_dir, dtype: str, device: str, prompts, max_tokens: int, max_len: int) -> list[list[int]]:
    from engine.llm import LLM
    llm = LLM(str(model_dir), dtype=dtype, device=device, max_model_len=max_len,
              num_gpu_blocks=2 * (-(-max_len // 16)) + 64, max_num_seqs=8, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [list(o) for o in outs]


def connect(node: NodeProc, role: str) -> dict:
    import grpc
    channel = grpc.aio.insecure_channel(node.address, options=[("grpc.max_receive_message_length", 16 * 2**20),
                                                               ("grpc.max_send_message_length", 16 * 2**20)])
    stub = (node_pb2_grpc.DecodeNodeStub if role == "decode" else node_pb2_grpc.PrefillNodeStub)(channel)
    return {"address": node.address, "channel": channel, "stub": stub}


# ---- sections ---------------------------------------------------------------------------------------
async def equality(ns, prefill, decode, model_dir, dtype, device, transports, vocab, tag) -> dict:
    lengths = [37, 300, min(1500, max(ns.sizes))]
    if ns.chunk_tokens and 2 * ns.chunk_tokens + 100 <= max(ns.sizes):
        lengths.append(2 * ns.chunk_tokens + 100)  # three chunks: its KV streams over grpc
    prompts = prompts_for(vocab, lengths, seed=1)
    want = ns.reference[tag]
    got = {}
    for name in transports:
        outs, used = [], set()
        for i, p in enumerate(prompts):
            tokens, done = await generate(prefill, decode, f"eq-{tag}-{name}-{i}", p, ns.eq_tokens, TRANSPORTS[name])
            outs.append(tokens)
            used.add(transport_name(done.transport))
        got[name] = {"equal": outs == want, "used": sorted(used),
                     "first_tokens_equal": [o[:1] == w[:1] for o, w in zip(outs, want)],
                     "tokens_equal": [sum(a == b for a, b in zip(o, w)) for o, w in zip(outs, want)],
                     "first_mismatch": next((i for i, (a, b) in enumerate(zip(outs, want)) if a != b), None)}
        log(f"equality {tag} {name}: {'OK' if outs == want else 'MISMATCH'} (transport used: {sorted(used)})")
    return {"lengths": lengths, "max_tokens": ns.eq_tokens, "transports": got}


async def node_path(ns, prefill, decode, transports, vocab) -> dict:
    rows = {}
    for name in transports:
        for n in ns.sizes:
            ms, gaps, prefill_ms, nbytes = [], [], [], 0
            for r in range(ns.repeats + 1):
                (p,) = prompts_for(vocab, [n], seed=100 + r)
                timing = {}
                _, done = await generate(prefill, decode, f"np-{name}-{n}-{r}", p, 2, TRANSPORTS[name], timing)
                if r:  # the first one warms up (pinned buffers, ipc handles)
                    ms.append(done.ms)
                    gaps.append(timing["after_first_ms"])
                    prefill_ms.append(timing["prefill_ms"])
                nbytes = done.bytes
            med = statistics.median(ms)
            rows[f"{name}/{n}"] = {"transport": name, "tokens": n, "bytes": nbytes, "ms_median": med, "ms": ms,
                                   "gb_s": nbytes / med / 1e6, "chunk_tokens": ns.chunk_tokens,
                                   "after_first_ms_median": statistics.median(gaps),
                                   "prefill_ms_median": statistics.median(prefill_ms)}
            log(f"node path {name} {n} tokens: {nbytes / 1e6:.0f} MB, TransferDone.ms {med:.2f} "
                f"(= {nbytes / med / 1e6:.2f} GB/s), first token -> transfer done {statistics.median(gaps):.2f} ms, "
                f"prefill {statistics.median(prefill_ms):.1f} ms")
    return rows


async def transport_only(ns, decode, spec: KVSpec, device: torch.device, senders: dict) -> dict:
    rows = {}
    d = decode["stub"]
    for n in ns.sizes:
        blocks = -(-n // spec.block_size)
        shape = (spec.num_layers, blocks, *spec.block_shape)
        k = torch.randn(shape, device=device).to(spec.dtype)
        v = torch.randn(shape, device=device).to(spec.dtype)
        for name, sender in senders.items():
            ms = []
            for r in range(ns.repeats + 1):
                rid = f"raw-{name}-{n}-{r}"
                res = await d.Reserve(node_pb2.ReserveRequest(request_id=rid, num_prompt_tokens=n, lease_ms=30_000),
                                      timeout=30)
                target = node_pb2.KVTarget(decode_address=decode["address"], reservation_id=res.reservation_id,
                                           transport=sender.transport, layout=res.layout, decode_node_id=res.node_id,
                                           kv_lanes=res.kv_lanes)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                sent = await sender.send(target, k, v, timeout=60)
                elapsed = (time.perf_counter() - t) * 1000.0
                await d.Abort(node_pb2.NodeAbortRequest(request_id=rid), timeout=10)
                if r:
                    ms.append(elapsed)
            med = statistics.median(ms)
            rows[f"{name}/{n}"] = {"sender": name, "tokens": n, "bytes": sent, "ms_median": med, "ms": ms,
                                   "gb_s": sent / med / 1e6}
            log(f"transport only {name} {n} tokens: {sent / 1e6:.0f} MB in {med:.2f} ms = {sent / med / 1e6:.2f} GB/s")
        del k, v
    return rows


async def run_model(ns, tag: str, shape: dict, dtype: str, device: str, sections: list[str], results: dict) -> None:
    torch_dtype = getattr(torch, dtype)
    t = time.perf_counter()
    model = build_hf_model(shape, device, torch_dtype, seed=0)
    model_dir, _ = save_model_dir(model, shape, tag)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"{tag}: model saved to {model_dir} in {time.perf_counter() - t:.1f} s")
    transports = ["grpc"] + (["ipc"] if device == "cuda" else [])
    max_len = max(ns.sizes) + 64
    lengths = [37, 300, min(1500, max(ns.sizes))]
    if ns.chunk_tokens and 2 * ns.chunk_tokens + 100 <= max(ns.sizes):
        lengths.append(2 * ns.chunk_tokens + 100)  # three chunks: its KV streams over grpc
    ns.reference[tag] = offline_outputs(model_dir, dtype, device, prompts_for(shape["vocab_size"], lengths, seed=1),
                                        ns.eq_tokens, max_len)
    log(f"{tag}: in-process reference done")
    args = node_args(ns, shape, dtype, device, ns.node_lanes[0])
    decode_p = NodeProc("decode", model_dir, args, ns.log_dir)
    prefill_p = NodeProc("prefill", model_dir, args, ns.log_dir)
    try:
        decode_p.wait(400)
        prefill_p.wait(400)
        log(f"{tag}: nodes ready")
        decode, prefill = connect(decode_p, "decode"), connect(prefill_p, "prefill")
        out = results.setdefault(tag, {})
        out["equality"] = await equality(ns, prefill, decode, model_dir, dtype, device, transports,
                                         shape["vocab_size"], tag)
        if "node" in sections:
            out["node_path"] = await node_path(ns, prefill, decode, transports, shape["vocab_size"])
            for lanes in ns.node_lanes[1:]:  # the same decode node; a prefill node with other lanes, grpc only
                await prefill["channel"].close()
                prefill_p.stop()
                prefill_p = NodeProc("prefill", model_dir, node_args(ns, shape, dtype, device, lanes), ns.log_dir)
                prefill_p.wait(400)
                prefill = connect(prefill_p, "prefill")
                rows = await node_path(ns, prefill, decode, ["grpc"], shape["vocab_size"])
                out["node_path"].update({f"grpc-x{lanes}/{key.split('/')[1]}": dict(row, lanes=lanes)
                                         for key, row in rows.items()})
        if "raw" in sections:
            spec = KVSpec(shape["num_hidden_layers"], 16, shape["num_key_value_heads"], shape["head_dim"], torch_dtype)
            channels = Channels()
            senders = {f"grpc-{mib}MiB" + (f"-x{lanes}" if lanes > 1 else ""):
                       GrpcKVSender(channels, max_frame_bytes=mib * 2**20, lanes=lanes)
                       for mib in ns.frames_mib for lanes in ns.lanes}
            if device == "cuda":
                senders["ipc"] = IpcKVSender(channels, torch.device("cuda", 0))
            out["transport_only"] = await transport_only(ns, decode, spec, torch.device(device), senders)
            await channels.close()
        load = await decode["stub"].GetLoad(node_pb2.NodeLoadRequest(), timeout=10)
        out["decode_idle"] = {"free_blocks": load.free_blocks, "total_blocks": load.total_blocks}
        for node in (decode, prefill):
            await node["channel"].close()
    finally:
        prefill_p.stop()
        decode_p.stop()


async def grpc_ceiling(total_bytes: int, frames_mib: list[int]) -> dict:
    """grpcio itself on loopback: a client stream of ready-made bytes messages into a handler that
    only counts them (no protobuf, no CRC, no copies of ours): the ceiling the gRPC transport chases."""
    import grpc
    from engine.rpc.server import SERVER_OPTIONS

    async def sink(request_iterator, context):
        n = 0
        async for msg in request_iterator:
            n += len(msg)
        return n.to_bytes(8, "little")
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Sink", {
        "Push": grpc.stream_unary_rpc_method_handler(sink)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rows = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_send_message_length", 16 * 2**20), ("grpc.max_receive_message_length", 16 * 2**20)]) as ch:
            push = ch.stream_unary("/bench.Sink/Push")
            for mib in frames_mib:
                msg = os.urandom(mib * 2**20)
                count = max(1, total_bytes // len(msg))
                ms = []
                for r in range(3):
                    t = time.perf_counter()
                    call = push()
                    for _ in range(count):
                        await call.write(msg)
                    await call.done_writing()
                    await call
                    ms.append((time.perf_counter() - t) * 1000.0)
                med = statistics.median(ms[1:])
                rows[f"{mib}MiB"] = {"frame_mib": mib, "bytes": count * len(msg), "ms_median": med,
                                     "gb_s": count * len(msg) / med / 1e6}
                log(f"grpcio ceiling {mib} MiB messages: {rows[f'{mib}MiB']['gb_s']:.2f} GB/s")
    finally:
        await server.stop(0)
    return rows


def table(results: dict) -> str:
    lines = ["", "KV transfer (median; gap: first token -> KV in place, node path only):",
             f"{'model':6} {'what':16} {'tokens':>6} {'MB':>8} {'ms':>9} {'GB/s':>7} {'gap ms':>8} {'chunk':>6}"]
    for tag, out in results.get("models", {}).items():
        for section in ("node_path", "transport_only"):
            for key, row in out.get(section, {}).items():
                lines.append(f"{tag:6} {section[:4] + ':' + key.split('/')[0]:16} {row['tokens']:>6} "
                             f"{row['bytes'] / 1e6:>8.1f} {row['ms_median']:>9.2f} {row['gb_s']:>7.2f} "
                             f"{row.get('after_first_ms_median', float('nan')):>8.2f} {row.get('chunk_tokens') or '-':>6}")
        for name, eq in out.get("equality", {}).get("transports", {}).items():
            lines.append(f"{tag:6} equality {name:7}: {'equal to in-process' if eq['equal'] else 'MISMATCH'} "
                         f"(used {','.join(eq['used'])})")
    for key, row in results.get("grpc_ceiling", {}).items():
        lines.append(f"grpcio alone, {key} messages: {row['bytes'] / 1e6:.0f} MB in {row['ms_median']:.1f} ms = "
                     f"{row['gb_s']:.2f} GB/s")
    for goal, ok in results.get("goals", {}).items():
        lines.append(f"goal {goal}: {'met' if ok else 'MISSED'}")
    return "\n".join(lines)


def goals(results: dict) -> dict:
    big = results.get("models", {}).get("8b", {})
    out = {}
    for section in ("node_path", "transport_only"):
        rows = big.get(section, {})
        ipc = [r for k, r in rows.items() if k.startswith("ipc/") and r["tokens"] == max(r2["tokens"] for r2 in rows.values())]
        grpc_rows = [r for k, r in rows.items() if k.startswith("grpc")]
        if ipc:
            out[f"{section}: ipc 7k-token KV < {GOAL_IPC_MS_7K} ms"] = ipc[0]["ms_median"] < GOAL_IPC_MS_7K
        if grpc_rows:
            out[f"{section}: grpc >= {GOAL_GRPC_GBS} GB/s (best size)"] = max(r["gb_s"] for r in grpc_rows) >= GOAL_GRPC_GBS
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench/results/kv_transfer.json"))
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny model only, small sizes")
    ap.add_argument("--sizes", default="1024,4096,7168")
    ap.add_argument("--frames-mib", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eq-tokens", type=int, default=16)
    ap.add_argument("--sections", default="node,raw,ceiling")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--lanes", default="1,2", help="transport only: gRPC lane counts to time (PushKV streams)")
    ap.add_argument("--node-lanes", default="0",
                    help="node path: the prefill node's --kv-grpc-lanes, comma-separated (0 = its default); the "
                         "first for every section, each further one a restarted prefill node timed over grpc")
    ap.add_argument("--cpu-wide", action="store_true",
                    help="CPU: a 16-layer model with 64 KiB of KV per token (the tiny one's is tiny) at --sizes")
    ap.add_argument("--chunk-tokens", type=int, default=0,
                    help="the nodes' token budget (default: the longest prompt, one chunk); when given, long "
                         "prompts prefill in chunks and, over grpc, stream their KV chunk by chunk (--kv-stream-chunks)")
    ns = ap.parse_args(argv)
    ns.sizes = [int(x) for x in ns.sizes.split(",")] if not ns.tiny else [64, 256]
    ns.frames_mib = [int(x) for x in ns.frames_mib.split(",")]
    ns.lanes = [int(x) for x in ns.lanes.split(",")]
    ns.node_lanes = [int(x) for x in ns.node_lanes.split(",")]
    ns.reference = {}
    out_path = pathlib.Path(ns.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ns.log_dir = out_path.parent
    device = "cpu" if ns.tiny or not torch.cuda.is_available() else "cuda"
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(shlex.quote(a) for a in sys.argv), "models": {}, "errors": []}
    sections = ns.sections.split(",")
    plan = [("tiny", TINY, "float32", ["node"] if device == "cuda" else sections)]
    if ns.cpu_wide and device == "cpu":
        plan = [("wide", WIDE, "float32", sections)]
    if device == "cuda" and not ns.skip_8b:
        plan.append(("8b", LLAMA3_8B, "bfloat16", sections))
    for tag, shape, dtype, secs in plan:
        try:
            asyncio.run(run_model(ns, tag, shape, dtype, device, secs, results["models"]))
        except Exception as exc:  # report and go on with the next model
            traceback.print_exc()
            results["errors"].append(f"{tag}: {type(exc).__name__}: {exc}"[:2000])
        out_path.write_text(json.dumps(results, indent=1))
    if "ceiling" in sections:
        results["grpc_ceiling"] = asyncio.run(grpc_ceiling(940 * 10**6 if device == "cuda" else 64 * 2**20,
                                                           ns.frames_mib))
    results["goals"] = goals(results)
    out_path.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
