"""Tile sweep of the paged decode attention kernel, bf16 cache vs fp8 (e4m3) cache with fp16 dots
(the default) and with bf16 dots (CUDA only).

For each (batch, context) on the Llama-3-8B attention shape (32 q heads, 8 kv heads, head_dim 128,
16-token blocks) it times every (block_n, num_warps, num_stages) with triton.testing.do_bench,
prints the default tile's time, the best tile and its achieved bandwidth, and writes JSON.

    python bench/decode_kernel_sweep.py --out bench/results/decode_sweep_h200.json
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from kernels.paged_decode_attention import decode_bytes, paged_decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DEFAULT = (64, 4, 3)  # block_n, num_warps, num_stages: the tile before fp8 tiles were chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="1x1024,64x1024,256x1024,64x4096,8x32768", help="BATCHxCONTEXT,...")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    torch.manual_seed(0)
    tiles = list(itertools.product(*(map(int, a.split(",")) for a in (args.block_n, args.warps, args.stages))))
    rows = []
    print(f"{'case':>12} {'kv':>11} {'64,4,3 us':>10} {'auto us':>8} {'best us':>8} {'best tile (n,w,s)':>18} {'TB/s':>6}")
    for case in args.cases.split(","):
        batch, ctx = map(int, case.split("x"))
        nblk = ctx // BLOCK
        k = torch.randn(batch * nblk + 1, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        tables = (torch.randperm(batch * nblk, device="cuda") + 1).view(batch, nblk).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        for name, kc, vc, compute in (("bf16", k, v, None), ("fp8", k8, v8, None),  # fp8: f16 dots, the default
                                      ("fp8-bf16dot", k8, v8, torch.bfloat16)):
            ref = paged_decode_attention(q, kc, vc, tables, lens, HEAD_DIM**-0.5, max_seq_len=ctx)
            times = {}
            for bn, w, st in tiles:
                def run():
                    return paged_decode_attention(q, kc, vc, tables, lens, HEAD_DIM**-0.5, max_seq_len=ctx,
                                                  block_n=bn, num_warps=w, num_stages=st, fp8_compute=compute)
                try:
                    out = run()
                    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
                    times[(bn, w, st)] = triton.testing.do_bench(run) * 1e3
                except Exception as e:  # out of shared memory for a tile: skip it, say so
                    print(f"  skip {name} {case} tile {(bn, w, st)}: {type(e).__name__}: {str(e)[:80]}")
            auto_us = triton.testing.do_bench(lambda: paged_decode_attention(  # the kernel's own tile choice
                q, kc, vc, tables, lens, HEAD_DIM**-0.5, max_seq_len=ctx, fp8_compute=compute)) * 1e3
            best = min(times, key=times.get)
            tbs = decode_bytes(batch, ctx, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, kc.dtype) / times[best] / 1e6
            rows.append({"batch": batch, "context": ctx, "kv": name, "default_us": times.get(DEFAULT), "auto_us": auto_us,
                         "best_us": times[best], "best_tile": list(best), "best_tbs": tbs,
                         "all_us": {",".join(map(str, t)): us for t, us in times.items()}})
            print(f"{case:>12} {name:>11} {times.get(DEFAULT, float('nan')):10.1f} {auto_us:8.1f} {times[best]:8.1f} "
                  f"{str(best):>18} {tbs:6.2f}")
            del kc, vc
        del k8, v8
    for case in {(r["batch"], r["context"]) for r in rows}:
        b16, f8, f8b = (next(r for r in rows if (r["batch"], r["context"]) == case and r["kv"] == n)
                        for n in ("bf16", "fp8", "fp8-bf16dot"))
        print(f"batch {case[0]} ctx {case[1]}: fp8/bf16 auto tiles {f8['auto_us'] / b16['auto_us']:.2f}, "
              f"best {f8['best_us'] / b16['best_us']:.2f} (bf16 dots: {f8b['best_us'] / b16['best_us']:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                       "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
