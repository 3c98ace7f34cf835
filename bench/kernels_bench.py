"""Times the attention kernels on a GPU and writes bench/results/kernels.json-style output.

    python bench/kernels_bench.py --out kernels.json [--sweep]

Shapes: Llama-3-8B attention (32 query / 8 kv heads, head_dim 128), bf16, cache block 16.
Decode: achieved bandwidth = bytes of K, V, q and out the step must move / time, against the
3.0 TB/s device-to-device copy ceiling measured on the H100 (docs/DEVICE.md).
Prefill: TFLOP/s on one causal prompt read through a random block table, against
F.scaled_dot_product_attention (flash backend) on the same problem in contiguous [1, 32, n, 128].
KV write: bytes read + written / time against the same ceiling.
Timing: CUDA events around each call, median of the timed calls after warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.kv_cache_write import kv_write_bytes, write_kv_cache  # noqa: E402
from kernels.paged_decode_attention import (  # noqa: E402
    choose_num_splits,
    decode_bytes,
    num_sms,
    paged_decode_attention,
)
from kernels.paged_prefill_attention import (  # noqa: E402
    TileClass,
    causal_flops,
    paged_prefill_attention,
    plan_tiles,
)

HEADS, KV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
COPY_TBS = 3.0  # measured device-to-device copy ceiling, TB/s (H100, DEVICE.md)


def time_ms(fn, warmup: int = 5, iters: int = 30) -> float:
    """Median GPU time of one call. Calls are queued back to back (no sync between them), so the
    host's launch cost is hidden whenever the GPU work is longer than it."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(stop) for start, stop in events)


def graph_ms(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time of one call with no launch cost: `calls` calls captured in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # warm the allocator on the capture stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    return time_ms(graph.replay, warmup=2, iters=replays) / calls


def host_bound_ms(fn, iters: int = 30) -> float:
    """Wall time per call with a sync after each: what a caller that waits sees (launch included)."""
    import time

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def paged_problem(lens: list[int], num_tokens_q: int):
    blocks = [-(-n // BS) for n in lens]
    total = sum(blocks)
    ids = torch.randperm(total, device="cuda") + 1
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device="cuda")
    at = 0
    for b, n in enumerate(blocks):
        table[b, :n] = ids[at : at + n].int()
        at += n
    k_cache = torch.randn(total + 1, BS, KV, D, dtype=DT, device="cuda")
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(num_tokens_q, HEADS, D, dtype=DT, device="cuda")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, table, seq_lens


def bench_decode(batch: int, ctx: int, sweep: bool, log: list[str]) -> dict:
    q, k_cache, v_cache, table, seq_lens = paged_problem([ctx] * batch, batch)
    out = torch.empty_like(q)
    nbytes = decode_bytes(batch, ctx, HEADS, KV, D, DT)

    def run(**kw):
        return time_ms(lambda: paged_decode_attention(q, k_cache, v_cache, table, seq_lens, D**-0.5, out,
                                                      max_seq_len=ctx, **kw))

    ms = run()
    host_ms = host_bound_ms(lambda: paged_decode_attention(q, k_cache, v_cache, table, seq_lens, D**-0.5, out,
                                                           max_seq_len=ctx))
    gms = graph_ms(lambda: paged_decode_attention(q, k_cache, v_cache, table, seq_lens, D**-0.5, out,
                                                  max_seq_len=ctx))
    splits = choose_num_splits(batch, KV, ctx, num_sms(q.device))
    result = {"us": ms * 1e3, "tbs": nbytes / ms / 1e9, "num_splits": splits, "synced_call_us": host_ms * 1e3,
              "graph_us": gms * 1e3, "graph_bw_frac": nbytes / gms / 1e9 / COPY_TBS}
    result["bw_frac"] = result["tbs"] / COPY_TBS
    log.append(f"decode b{batch} ctx{ctx}: {ms * 1e3:8.1f} us {result['tbs']:5.2f} TB/s "
               f"({result['bw_frac']:.0%} of {COPY_TBS}) splits={splits}; in a CUDA graph {gms * 1e3:.1f} us "
               f"({result['graph_bw_frac']:.0%}); one synced call {host_ms * 1e3:.1f} us")
    if sweep:
        best = (ms, "default")
        for s in sorted({1, 2, 4, 8, 16} | {splits}):
            for bn, warps, stages in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 4), (128, 4, 2), (128, 8, 2),
                                      (128, 8, 3)):
                try:
                    t = run(num_splits=s, block_n=bn, num_warps=warps, num_stages=stages)
                except Exception as e:  # out of resources: skip the config
                    log.append(f"  splits={s} bn={bn} w={warps} st={stages}: {type(e).__name__}")
                    continue
                log.append(f"  splits={s:2d} bn={bn:3d} w={warps} st={stages}: {t * 1e3:8.1f} us "
                           f"{nbytes / t / 1e9:5.2f} TB/s")
                best = min(best, (t, f"splits={s} bn={bn} w={warps} st={stages}"))
        result["sweep_best_us"] = best[0] * 1e3
        result["sweep_best_bw_frac"] = nbytes / best[0] / 1e9 / COPY_TBS
        result["sweep_best_config"] = best[1]
        log.append(f"  best: {best[1]} {best[0] * 1e3:.1f} us")
    return result


def bench_prefill(n: int, sweep: bool, log: list[str]) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k_cache, v_cache, table, seq_lens = paged_problem([n], n)
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    group = HEADS // KV
    flops = causal_flops([n], [n], HEADS, D)

    def run(classes=None):
        tiles = plan_tiles([n], group, q.device, **({"classes": classes} if classes else {}))
        return time_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, qsl, seq_lens, table, D**-0.5, n,
                                                       out, tiles=tiles), warmup=3, iters=10)

    ms = run()
    # The same problem, contiguous, MHA layout for the flash kernel (K/V repeated per query head).
    qc = torch.randn(1, HEADS, n, D, dtype=DT, device="cuda")
    kc = torch.randn(1, HEADS, n, D, dtype=DT, device="cuda")
    vc = torch.randn(1, HEADS, n, D, dtype=DT, device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref_ms = time_ms(lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True), warmup=3, iters=10)
    result = {"us": ms * 1e3, "tflops": flops / ms / 1e9, "sdpa_us": ref_ms * 1e3,
              "sdpa_tflops": flops / ref_ms / 1e9, "ratio": ref_ms / ms}
    log.append(f"prefill n{n}: {result['tflops']:6.1f} TFLOP/s, sdpa flash {result['sdpa_tflops']:6.1f}"
               f" -> ratio {result['ratio']:.2f}")
    if sweep:
        best = (ms, "default")
        for bm, bn, warps, stages in ((128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                                      (128, 128, 8, 3), (128, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                                      (64, 128, 4, 3), (64, 64, 4, 4), (128, 32, 8, 4)):
            try:
                t = run([TileClass(bm, bn, warps, stages)])
            except Exception as e:
                log.append(f"  bm={bm} bn={bn} w={warps} st={stages}: {type(e).__name__}")
                continue
            log.append(f"  bm={bm:3d} bn={bn:3d} w={warps} st={stages}: {flops / t / 1e9:6.1f} TFLOP/s")
            best = min(best, (t, f"bm={bm} bn={bn} w={warps} st={stages}"))
        result["sweep_best_ratio"] = ref_ms / best[0]
        result["sweep_best_config"] = best[1]
        log.append(f"  best: {best[1]} ratio {ref_ms / best[0]:.2f}")
    return result


def bench_mixed(log: list[str]) -> dict:
    """A chunked-prefill step: one 2048-token chunk after 2048 cached + 255 decode rows at 4k."""
    lens = [4096] + [4096] * 255
    qlens = [2048] + [1] * 255
    q, k_cache, v_cache, table, seq_lens = paged_problem(lens, sum(qlens))
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    tiles = plan_tiles(qlens, HEADS // KV, q.device)
    ms = time_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, qsl, seq_lens, table, D**-0.5, 2048,
                                                 tiles=tiles), warmup=3, iters=10)
    dq = q[2048:].contiguous()
    dec_ms = time_ms(lambda: paged_decode_attention(dq, k_cache, v_cache, table[1:].contiguous(),
                                                    seq_lens[1:].contiguous(), D**-0.5, max_seq_len=4096))
    log.append(f"mixed step (1x2048 chunk + 255 decode @4k) in the prefill kernel: {ms * 1e3:.1f} us;"
               f" the 255 decode rows alone in the decode kernel: {dec_ms * 1e3:.1f} us")
    return {"us": ms * 1e3, "decode_rows_alone_us": dec_ms * 1e3}


def bench_write(n: int, log: list[str]) -> dict:
    k_cache = torch.zeros(8192, BS, KV, D, dtype=DT, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(n, KV, D, dtype=DT, device="cuda")
    value = torch.randn_like(key)
    slots = torch.randperm(8191 * BS, device="cuda")[:n] + BS
    nbytes = kv_write_bytes(n, KV, D, DT)
    ms = time_ms(lambda: write_kv_cache(key, value, k_cache, v_cache, slots))
    gms = graph_ms(lambda: write_kv_cache(key, value, k_cache, v_cache, slots))
    # torch's own scatter of K and V to the same slots, in a graph too
    flat_k, flat_v = k_cache.view(-1, KV, D), v_cache.view(-1, KV, D)

    def torch_write():
        flat_k.index_copy_(0, slots, key)
        flat_v.index_copy_(0, slots, value)

    torch_gms = graph_ms(torch_write)
    log.append(f"kv write {n:6d} tokens: {ms * 1e3:7.1f} us queued ({nbytes / ms / 1e9:5.2f} TB/s); in a CUDA graph"
               f" {gms * 1e3:6.1f} us ({nbytes / gms / 1e9:5.2f} TB/s, {nbytes / gms / 1e9 / COPY_TBS:.0%});"
               f" torch index_copy_ of K and V in a graph {torch_gms * 1e3:6.1f} us")
    return {"us": ms * 1e3, "tbs": nbytes / ms / 1e9, "bw_frac": nbytes / ms / 1e9 / COPY_TBS,
            "graph_us": gms * 1e3, "graph_bw_frac": nbytes / gms / 1e9 / COPY_TBS, "torch_graph_us": torch_gms * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", action="store_true", help="also time other configs and split counts")
    args = ap.parse_args()
    torch.manual_seed(0)
    log: list[str] = []
    swept = ((64, 4096), (8, 32768), (32, 8192), (1, 32768))
    dec = {f"b{b}_ctx{c}": bench_decode(b, c, args.sweep and (b, c) in swept, log)
           for b, c in ((64, 4096), (8, 32768), (1, 32768), (32, 8192), (256, 1024), (256, 4096))}
    pre = {n: bench_prefill(n, args.sweep and n == 8192, log) for n in (4096, 8192, 16384)}
    mixed = bench_mixed(log)
    wr = {n: bench_write(n, log) for n in (256, 4096, 16384)}
    metrics = {
        "decode_bw_frac_bs64_ctx4k": dec["b64_ctx4096"]["bw_frac"],
        "decode_bw_frac_bs8_ctx32k": dec["b8_ctx32768"]["bw_frac"],
        "prefill_vs_sdpa_ratio_4k": pre[4096]["ratio"],
        "prefill_vs_sdpa_ratio_8k": pre[8192]["ratio"],
        "prefill_vs_sdpa_ratio_16k": pre[16384]["ratio"],
        "prefill_tflops_8k": pre[8192]["tflops"],
        "sdpa_flash_tflops_8k": pre[8192]["sdpa_tflops"],
        "decode_bw_frac_bs1_ctx32k_graph": dec["b1_ctx32768"]["graph_bw_frac"],
        "kv_write_bw_frac_16k_tokens": wr[16384]["bw_frac"],
        "kv_write_bw_frac_16k_tokens_graph": wr[16384]["graph_bw_frac"],
        "mixed_step_prefill_kernel_us": mixed["us"],
    }
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": "python bench/kernels_bench.py --out kernels.json" + (" --sweep" if args.sweep else ""),
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
        "metrics": metrics,
        "detail": {"decode": dec, "prefill": {str(k): v for k, v in pre.items()}, "mixed": mixed,
                   "kv_write": {str(k): v for k, v in wr.items()}},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(log))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
