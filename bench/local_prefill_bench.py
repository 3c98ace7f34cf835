"""Where does a decode node's own prefill pay? (the default of `--local-prefill-tokens`)

One stack of 1 prefill + 1 decode node per setting, the same load on each:
- bystanders: B streams decoding on the decode node the whole time (greedy, ignore_eos);
- follow-ups: for each size U, R sequential turns = a cached history of H tokens (sent once first,
  so the decode node holds it) + U new tokens, 4 new tokens each.
Setting `pd` (`--local-prefill-tokens 0`): every turn goes through the prefill node and a KV
transfer. Setting `local` (`--local-prefill-tokens 100000`): the decode node prefills the U new
tokens itself. Reported per U: the follow-up's TTFT (median) and the bystanders' inter-token gap
p99 while the follow-ups ran, for both settings, and the largest U where local wins TTFT without
raising the bystanders' p99 by more than 25 %.

    python bench/local_prefill_bench.py [--model M] [--sizes 16,64,256,1024] [--history 256]
        [--bystanders 4] [--repeats 5] [ENGINE FLAGS for pdserve serve ...]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import grpc

from protos.pdserve.v1 import generation_pb2 as g
from protos.pdserve.v1 import generation_pb2_grpc as gg


def _request(ids, max_tokens):
    return g.GenerateRequest(token_ids=g.TokenIds(ids=list(ids)), sampling=g.SamplingParameters(temperature=0.0),
                             stopping=g.StoppingCriteria(max_new_tokens=max_tokens, ignore_eos=True))


async def _bystander(stub, ids, gaps: list, stop: asyncio.Event):
    while not stop.is_set():
        last = None
        async for _ in stub.GenerateStream(_request(ids, 200), timeout=600):
            now = time.perf_counter()
            if last is not None:
                gaps.append((now, now - last))
            last = now
            if stop.is_set():
                break


async def _measure(address: str, ns) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gg.GenerationStub(channel)
        vocab = (await stub.ModelInfo(g.ModelInfoRequest(), timeout=30)).vocab_size
        tok = lambda i, k: (7919 * i + 104729 * k) % (vocab - 100) + 50  # noqa: E731
        history = [tok(i, 1) for i in range(ns.history)]
        await stub.Generate(_request(history, 4), timeout=300)  # the decode node (or both) caches it
        await asyncio.sleep(1.0)
        gaps: list = []
        stop = asyncio.Event()
        bystanders = [asyncio.ensure_future(_bystander(stub, [tok(i, 100 + b) for i in range(32)], gaps, stop))
                      for b in range(ns.bystanders)]
        await asyncio.sleep(2.0)
        out = {}
        for size in ns.sizes:
            ttfts, start = [], time.perf_counter()
            for r in range(ns.repeats):
                ids = history + [tok(i, 1000 * size + r) for i in range(size)]
                t0 = time.perf_counter()
                async for _ in stub.GenerateStream(_request(ids, 4), timeout=300):
                    ttfts.append(time.perf_counter() - t0)
                    break
            end = time.perf_counter()
            window = sorted(gap for t, gap in gaps if start <= t <= end)
            p99 = window[min(len(window) - 1, int(0.99 * len(window)))] if window else float("nan")
            out[size] = {"ttft_ms": statistics.median(ttfts) * 1000, "bystander_itl_p99_ms": p99 * 1000}
        stop.set()
        await asyncio.gather(*bystanders, return_exceptions=True)
        return out


def _serve(ns, threshold: int, extra: list[str]):
    argv = [sys.executable, "-m", "router.cli", "serve", "--num-prefill", "1", "--num-decode", "1", "--no-gateway",
            "--port", str(ns.port), "--local-prefill-tokens", str(threshold), *extra]
    if ns.model:
        argv += ["--model", ns.model]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, line.split()[1]
    raise RuntimeError("the stack did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--sizes", default="16,64,256,1024", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--history", type=int, default=256)
    p.add_argument("--bystanders", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--port", type=int, default=50151)
    p.add_argument("--json", default=None)
    ns, extra = p.parse_known_args()
    results = {}
    for name, threshold in (("pd", 0), ("local", 100_000)):
        proc, address = _serve(ns, threshold, extra)
        try:
            results[name] = asyncio.run(_measure(address, ns))
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"{'new tokens':>10} {'TTFT pd':>9} {'TTFT local':>10} {'ITL p99 pd':>11} {'ITL p99 local':>13}")
    best = 0
    for size in ns.sizes:
        pd, local = results["pd"][size], results["local"][size]
        print(f"{size:>10} {pd['ttft_ms']:>9.1f} {local['ttft_ms']:>10.1f} {pd['bystander_itl_p99_ms']:>11.1f} "
              f"{local['bystander_itl_p99_ms']:>13.1f}")
        if local["ttft_ms"] < pd["ttft_ms"] and local["bystander_itl_p99_ms"] <= 1.25 * pd["bystander_itl_p99_ms"]:
            best = size
    print(f"largest size where the decode node's own prefill pays: {best or 'none'}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"results": results, "best": best, "args": sys.argv[1:]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
