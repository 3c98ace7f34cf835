"""NIXL against our CUDA IPC scatter for prefill -> decode KV moves on one GPU (issue 11 item 6).

    python bench/nixl_bench.py [--out $OUT/nixl.json] [--tokens 1024,4096,7168] [--repeats 5]

Two processes on one GPU, like a prefill node and a decode node: the child ("decode") allocates a
paged KV cache of the Llama-3-8B shape (32 layers, K and V tensors of [blocks, 16, 8, 128] bf16),
registers it with a NIXL agent (UCX backend) and hands the parent its agent metadata and CUDA IPC
handles of the same tensors. The parent ("prefill") holds a request's KV as `[layers, n, 16, 8,
128]` K and V and moves it into n scattered blocks of the child's cache three ways:

  nixl blocks   one WRITE of n x 64 descriptors (one per block, layer and K/V: 32 KiB each), from
                dlists prepared once (vLLM's NIXL connector does the same); timed from
                make_prepped_xfer to DONE.
  nixl layers   the best case for NIXL: the n blocks contiguous on the decode side, one descriptor
                per layer and K/V (64 descriptors of n x 32 KiB).
  ipc scatter   what `--kv-transport ipc` does (engine/kv_transfer/ipc.py scatter_into): the cache
                opened through CUDA IPC, one index_copy_ per layer and K/V on a side stream.

Every move is checked: the destination blocks, read back through the IPC view, equal the source.
The metadata between the two processes is length-prefixed raw bytes on pipes (no pickle). Needs a
CUDA GPU and the `nixl` package (pip nixl-cu13 / nixl-cu12). Prints a table; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import struct
import subprocess
import sys
import time

import torch

LAYERS, BLOCK, KV_HEADS, HEAD_DIM = 32, 16, 8, 128
DTYPE = torch.bfloat16


def nixl_module():
    try:
        import nixl_cu13 as nx  # the wheel's own module name
    except ImportError:
        try:
            import nixl_cu12 as nx
        except ImportError:
            import nixl as nx
    return nx


def write_frame(f, data: bytes) -> None:
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def read_frame(f) -> bytes:
    n = struct.unpack("<Q", f.read(8))[0]
    return f.read(n)


def share(t: torch.Tensor) -> dict:
    dev, handle, size, offset, ref, ref_off, event, sync = t.untyped_storage()._share_cuda_()
    return {"device": dev, "handle": handle.hex(), "size": size, "offset": offset, "ref": ref.hex(),
            "ref_offset": ref_off, "event": (event or b"").hex(), "sync": bool(sync)}


def open_shared(h: dict, shape: tuple) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared_cuda(h["device"], bytes.fromhex(h["handle"]), h["size"], h["offset"],
                                                    bytes.fromhex(h["ref"]), h["ref_offset"],
                                                    bytes.fromhex(h["event"]) or None, h["sync"])
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=DTYPE, _internal=True)
    return torch._utils._rebuild_tensor(typed, 0, shape, torch.empty(shape, device="meta").stride())


# ---- decode side ---------------------------------------------------------------------------------
def target(num_blocks: int) -> int:
    out = os.fdopen(os.dup(1), "wb")  # the frames' own pipe; NIXL and UCX log to stdout: send that to stderr
    os.dup2(2, 1)
    nx = nixl_module()
    torch.cuda.set_device(0)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k = [torch.zeros(shape, dtype=DTYPE, device="cuda") for _ in range(LAYERS)]
    v = [torch.zeros(shape, dtype=DTYPE, device="cuda") for _ in range(LAYERS)]
    agent = nx.nixl_agent("decode", nx.nixl_agent_config(backends=["UCX"]))
    agent.register_memory(k + v)
    torch.cuda.synchronize()
    write_frame(out, agent.get_agent_metadata())
    write_frame(out, json.dumps({"k": [share(t) for t in k], "v": [share(t) for t in v],
                                 "k_addr": [t.data_ptr() for t in k], "v_addr": [t.data_ptr() for t in v]}).encode())
    sys.stdin.buffer.read(1)  # the parent closes stdin when it is done
    return 0


# ---- prefill side --------------------------------------------------------------------------------
def median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", default="prefill", choices=["prefill", "decode"])
    p.add_argument("--tokens", default="1024,4096,7168")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num-blocks", type=int, default=1024, help="decode cache blocks (16 tokens each)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.role == "decode":
        return target(args.num_blocks)
    import numpy as np
    nx = nixl_module()
    torch.cuda.set_device(0)
    child = subprocess.Popen([sys.executable, __file__, "--role", "decode", "--num-blocks", str(args.num_blocks)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=os.environ.copy())
    try:
        meta = read_frame(child.stdout)
        info = json.loads(read_frame(child.stdout))
        shape = (args.num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
        rk = [open_shared(h, shape) for h in info["k"]]
        rv = [open_shared(h, shape) for h in info["v"]]
        agent = nx.nixl_agent("prefill", nx.nixl_agent_config(backends=["UCX"]))
        remote = agent.add_remote_agent(meta)
        block_bytes = BLOCK * KV_HEADS * HEAD_DIM * DTYPE.itemsize
        rows = []
        results = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(timespec="seconds"), "command": " ".join(sys.argv), "torch": torch.__version__,
                   "block_bytes": block_bytes, "rows": rows}
        # Remote dlist of every block of every layer and K/V: index = (kv * LAYERS + layer) * num_blocks + block
        addrs = info["k_addr"] + info["v_addr"]
        remote_descs = np.array([(a + b * block_bytes, block_bytes, 0) for a in addrs for b in range(args.num_blocks)],
                                dtype=np.uint64)
        t = time.perf_counter()
        remote_h = agent.prep_xfer_dlist(remote, remote_descs, "VRAM")
        prep_remote_s = time.perf_counter() - t
        gen = torch.Generator().manual_seed(0)
        for tokens in [int(x) for x in args.tokens.split(",")]:
            n = -(-tokens // BLOCK)
            src = torch.randn((2, LAYERS, n, BLOCK, KV_HEADS, HEAD_DIM), device="cuda", dtype=DTYPE)
            reg = agent.register_memory([src])
            base = src.data_ptr()
            local_descs = np.array([(base + i * block_bytes, block_bytes, 0) for i in range(2 * LAYERS * n)],
                                   dtype=np.uint64)
            t = time.perf_counter()
            local_h = agent.prep_xfer_dlist("NIXL_INIT_AGENT", local_descs, "VRAM")
            prep_local_s = time.perf_counter() - t
            nbytes = src.numel() * src.element_size()

            def check(block_ids: torch.Tensor) -> bool:
                torch.cuda.synchronize()
                idx = block_ids.cuda()
                return all(torch.equal(rk[l].index_select(0, idx), src[0, l]) and
                           torch.equal(rv[l].index_select(0, idx), src[1, l]) for l in range(LAYERS))

            def clear():
                for tns in rk + rv:
                    tns.zero_()
                torch.cuda.synchronize()

            def nixl_move(local_idx, remote_idx) -> float:
                t0 = time.perf_counter()
                h = agent.make_prepped_xfer("WRITE", local_h, local_idx, remote_h, remote_idx)
                state = agent.transfer(h)
                while state == "PROC":
                    state = agent.check_xfer_state(h)
                dt = time.perf_counter() - t0
                if state != "DONE":
                    raise RuntimeError(f"NIXL transfer ended in state {state}")
                agent.release_xfer_handle(h)
                return dt

            timings: dict[str, list[float]] = {"nixl blocks": [], "nixl layers": [], "ipc scatter": []}
            ok = {key: True for key in timings}
            local_idx = np.arange(2 * LAYERS * n, dtype=np.int32)
            for r in range(args.repeats + 1):
                ids = torch.randperm(args.num_blocks, generator=gen)[:n]
                remote_idx = np.array([(kv * LAYERS + l) * args.num_blocks + b for kv in range(2) for l in range(LAYERS)
                                       for b in ids.tolist()], dtype=np.int32)
                clear()
                dt = nixl_move(local_idx, remote_idx)
                good = check(ids)
                if r:
                    timings["nixl blocks"].append(dt)
                ok["nixl blocks"] &= good
                # contiguous destination: NIXL may merge adjacent descriptors into one per layer and K/V
                start = int(torch.randint(0, args.num_blocks - n + 1, (1,), generator=gen))
                cids = torch.arange(start, start + n)
                remote_idx = np.array([(kv * LAYERS + l) * args.num_blocks + b for kv in range(2) for l in range(LAYERS)
                                       for b in cids.tolist()], dtype=np.int32)
                clear()
                dt = nixl_move(local_idx, remote_idx)
                good = check(cids)
                if r:
                    timings["nixl layers"].append(dt)
                ok["nixl layers"] &= good
                # our ipc transport's scatter
                clear()
                stream = torch.cuda.Stream()
                t0 = time.perf_counter()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    idx = ids.to("cuda", non_blocking=True)
                    for l in range(LAYERS):
                        rk[l].index_copy_(0, idx, src[0, l])
                        rv[l].index_copy_(0, idx, src[1, l])
                stream.synchronize()
                dt = time.perf_counter() - t0
                good = check(ids)
                if r:
                    timings["ipc scatter"].append(dt)
                ok["ipc scatter"] &= good
            for key, xs in timings.items():
                ms = median_ms(xs)
                rows.append({"tokens": tokens, "blocks": n, "bytes": nbytes, "path": key, "median_ms": ms,
                             "gb_s": round(nbytes / (ms / 1e3) / 1e9, 1), "correct": ok[key],
                             "prep_local_ms": round(prep_local_s * 1e3, 2), "times_ms": [round(x * 1e3, 3) for x in xs]})
            agent.release_dlist_handle(local_h)
            agent.deregister_memory(reg)
            del src
        results["prep_remote_ms"] = round(prep_remote_s * 1e3, 2)
        print(f"\nNIXL {getattr(nx, '__name__', 'nixl')} vs CUDA IPC scatter, one GPU, two processes "
              f"(medians of {args.repeats}; remote dlist prepared once in {results['prep_remote_ms']} ms)")
        print("| tokens | MB | path | ms | GB/s | correct |\n|---:|---:|---|---:|---:|---|")
        for r in rows:
            print(f"| {r['tokens']} | {r['bytes'] / 1e6:.0f} | {r['path']} | {r['median_ms']} | {r['gb_s']} | {r['correct']} |")
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
        return 0 if all(r["correct"] for r in rows) else 1
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
