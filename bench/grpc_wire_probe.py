"""What bounds a gRPC KV stream between two processes on one host: grpcio itself, our per-frame work,
or one connection? A sink server in a child process, a client pushing 8 MiB messages, varying one
thing at a time (connections in parallel, channel options, the client building frames as our sender
does, the server checking and copying them as our receiver does, the checksum function).

    python bench/grpc_wire_probe.py [--total-mb 940] [--out OUT/probe.json]

Prints one line per configuration (median of 3 runs, GB/s of payload) and the checksum speeds.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing as mp
import os
import statistics
import time
import zlib

import grpc
import numpy as np

MIB = 2**20
LIMITS = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]


def checksums() -> dict:
    """name -> function of a read-only buffer; only the libraries that import here."""
    out = {"zlib": zlib.crc32}
    try:
        from isal import isal_zlib
        out["isal"] = isal_zlib.crc32
    except ImportError:
        pass
    try:
        import crc32c
        out["crc32c"] = crc32c.crc32c
    except ImportError:
        pass
    return out


def _server(port_q, opts, work: str, crc: str) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(8)
    fn = checksums()[crc]
    staging = np.empty(64 * MIB, dtype=np.uint8)

    def check_and_copy(msg: bytes) -> None:
        fn(msg)
        staging[:len(msg)] = np.frombuffer(msg, dtype=np.uint8)

    async def sink(it, ctx):
        loop = asyncio.get_running_loop()
        n, pending = 0, []
        async for m in it:
            n += len(m)
            if work == "work":
                pending.append(loop.run_in_executor(pool, check_and_copy, m))
                if len(pending) >= 4:
                    await pending.pop(0)
        for p in pending:
            await p
        return n.to_bytes(8, "little")

    async def run():
        s = grpc.aio.server(options=LIMITS + opts)
        s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "probe.Sink", {"Push": grpc.stream_unary_rpc_method_handler(sink)}),))
        port = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        port_q.put(port)
        await s.wait_for_termination()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run())


async def _push(ch, count: int, frame, build: str, crc, pool) -> None:
    loop = asyncio.get_running_loop()
    call = ch.stream_unary("/probe.Sink/Push")()
    if build == "ready":
        for _ in range(count):
            await call.write(frame)
    else:  # as our sender: checksum + header + payload joined on worker threads, 4 frames ahead
        def make() -> bytes:
            crc(frame)
            return b"".join((b"\x0a\x10" + b"h" * 16, b"\x2a", b"\x80\x80\x80\x04", memoryview(frame)))
        ahead = [loop.run_in_executor(pool, make) for _ in range(min(4, count))]
        left = count - len(ahead)
        while ahead:
            data = await ahead.pop(0)
            if left:
                ahead.append(loop.run_in_executor(pool, make))
                left -= 1
            await call.write(data)
    await call.done_writing()
    await call


async def _client(port: int, copts, conns: int, total: int, mib: int, build: str, crc: str) -> float:
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=LIMITS + [
        ("grpc.use_local_subchannel_pool", 1), ("probe.channel", i)] + copts) for i in range(conns)]
    frame = np.frombuffer(os.urandom(mib * MIB), dtype=np.uint8) if build != "ready" else os.urandom(mib * MIB)
    count = max(1, total // (mib * MIB) // conns)
    pool = concurrent.futures.ThreadPoolExecutor(8)
    fn = checksums()[crc]
    await asyncio.gather(*(_push(c, 2, frame, build, fn, pool) for c in chans))  # connect, warm
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        await asyncio.gather(*(_push(c, count, frame, build, fn, pool) for c in chans))
        rates.append(count * conns * mib * MIB / (time.perf_counter() - t) / 1e9)
    for c in chans:
        await c.close()
    pool.shutdown()
    return statistics.median(rates)


def run(name: str, total: int, sopts=(), copts=(), conns=1, mib=8, build="ready", work="count", crc="zlib") -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_server, args=(q, list(sopts), work, crc), daemon=True)
    p.start()
    try:
        port = q.get(timeout=60)
        gbs = asyncio.run(_client(port, list(copts), conns, total, mib, build, crc))
    finally:
        p.kill()
        p.join()
    print(f"{name:58s} {gbs:5.2f} GB/s", flush=True)
    return {"name": name, "gb_s": gbs, "conns": conns, "mib": mib, "build": build, "work": work, "crc": crc,
            "server_options": [list(o) for o in sopts], "client_options": [list(o) for o in copts]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total-mb", type=int, default=940)
    ap.add_argument("--out")
    ns = ap.parse_args()
    total = ns.total_mb * 10**6
    rows = []
    buf = os.urandom(8 * MIB)
    speeds = {}
    for name, fn in checksums().items():
        fn(buf)
        t = time.perf_counter()
        for _ in range(10):
            fn(buf)
        speeds[name] = 8 * MIB * 10 / (time.perf_counter() - t) / 1e9
        print(f"checksum {name}: {speeds[name]:.1f} GB/s (one thread)", flush=True)
    frame16 = ("grpc.http2.max_frame_size", 16 * MIB - 1)
    nobdp = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 * MIB)]
    rows.append(run("grpcio, 1 connection, ready bytes", total))
    rows.append(run("grpcio, 1 connection, 4 MiB messages", total, mib=4))
    rows.append(run("grpcio, 1 connection, 16 MiB messages", total, mib=16))
    rows.append(run("grpcio, 2 connections", total, conns=2))
    rows.append(run("grpcio, 4 connections", total, conns=4))
    rows.append(run("grpcio, http2 max_frame_size 16 MiB", total, sopts=[frame16], copts=[frame16]))
    rows.append(run("grpcio, bdp probe off, lookahead 64 MiB", total, sopts=nobdp, copts=nobdp))
    for crc in checksums():
        rows.append(run(f"ours-like: build + check/copy, crc {crc}, 1 conn", total, build="build", work="work", crc=crc))
    best = max(checksums(), key=lambda c: speeds[c])
    rows.append(run(f"ours-like, crc {best}, 2 connections", total, conns=2, build="build", work="work", crc=best))
    rows.append(run(f"ours-like, crc {best}, 4 connections", total, conns=4, build="build", work="work", crc=best))
    rows.append(run("grpcio, 1 connection, ready bytes (again)", total))
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checksum_gb_s": speeds,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
