"""Times the attention kernels on a GPU and writes bench/results/kernels.json-style output.

    python bench/kernels_bench.py --out kernels.json [--sweep] [--fused-only]

Shapes: Llama-3-8B attention (32 query / 8 kv heads, head_dim 128), bf16, cache block 16.
Decode: achieved bandwidth = bytes of K, V, q and out the step must move / time, against the
3.0 TB/s device-to-device copy ceiling measured on the H100 (docs/DEVICE.md).
Prefill: TFLOP/s on one causal prompt read through a random block table, against
F.scaled_dot_product_attention (flash backend) on the same problem in contiguous [1, 32, n, 128].
KV write: bytes read + written / time against the same ceiling.
Fused decoder ops (RMSNorm, residual add + RMSNorm, SiLU-and-mul, rotary) at Llama-3-8B shapes
(hidden 4096, intermediate 14336) for 1, 256 and 8192 tokens: bytes they must move / time against
the same ceiling, and their torch references' time; `--fused-only` runs just that section.
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

from kernels.activation import silu_and_mul, silu_and_mul_bytes, silu_and_mul_ref  # noqa: E402
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
from kernels.rms_norm import (  # noqa: E402
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_bytes,
    rms_norm_ref,
)
from kernels.rotary import apply_rotary, apply_rotary_ref, rotary_bytes  # noqa: E402

HEADS, KV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
COPY_TBS = 3.0  # measured device-to-device copy ceiling, TB/s (H100, DEVICE.md)
HIDDEN, INTER, MAX_POS, NORM_EPS = 4096, 14336, 131072, 1e-5  # Llama-3-8B
FUSED_TOKENS = (1, 256, 8192)


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


def fused_problems(n: int) -> dict:
    """name -> (kernel call, torch reference call, bytes the op must move) for n tokens."""
    x = torch.randn(n, HIDDEN, dtype=DT, device="cuda")
    res = torch.randn_like(x)
    out = torch.empty_like(x)
    w = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(DT)
    gate_up = torch.randn(n, 2 * INTER, dtype=DT, device="cuda")
    act_out = torch.empty(n, INTER, dtype=DT, device="cuda")
    qkv = torch.randn(n, (HEADS + 2 * KV) * D, dtype=DT, device="cuda")
    q = qkv[:, : HEADS * D].view(n, HEADS, D)  # strided views of a fused qkv output, as in the model
    k = qkv[:, HEADS * D : (HEADS + KV) * D].view(n, KV, D)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float, device="cuda") / D)
    freqs = torch.arange(MAX_POS, dtype=torch.float, device="cuda")[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    pos = torch.randint(0, MAX_POS, (n,), device="cuda")
    # In-place ops run again and again on the same buffers: values stay finite (a rotation keeps
    # norms; the residual grows by one normed row a call).
    return {
        "rms_norm": (lambda: rms_norm(x, w, NORM_EPS, out), lambda: rms_norm_ref(x, w, NORM_EPS),
                     rms_norm_bytes(n, HIDDEN, DT)),
        "fused_add_rms_norm": (lambda: fused_add_rms_norm(x, res, w, NORM_EPS),
                               lambda: fused_add_rms_norm_ref(x, res, w, NORM_EPS),
                               rms_norm_bytes(n, HIDDEN, DT, add_residual=True)),
        "silu_and_mul": (lambda: silu_and_mul(gate_up, act_out), lambda: silu_and_mul_ref(gate_up),
                         silu_and_mul_bytes(n, INTER, DT)),
        "rotary": (lambda: apply_rotary(pos, q, k, cos, sin), lambda: apply_rotary_ref(pos, q, k, cos, sin),
                   rotary_bytes(n, HEADS, KV, D, DT)),
    }


def bench_fused_ops(log: list[str]) -> dict:
    """Each fused op at 1, 256 and 8192 tokens: queued and in-a-CUDA-graph time, bandwidth against
    the copy ceiling, and the torch reference (several kernels) timed the same ways."""
    result: dict = {}
    for n in FUSED_TOKENS:
        for name, (fn, ref, nbytes) in fused_problems(n).items():
            ms, gms = time_ms(fn), graph_ms(fn)
            ref_ms, ref_gms = time_ms(ref), graph_ms(ref)
            r = {"us": ms * 1e3, "tbs": nbytes / ms / 1e9, "bw_frac": nbytes / ms / 1e9 / COPY_TBS,
                 "graph_us": gms * 1e3, "graph_bw_frac": nbytes / gms / 1e9 / COPY_TBS,
                 "torch_us": ref_ms * 1e3, "torch_graph_us": ref_gms * 1e3, "bytes": nbytes}
            result.setdefault(name, {})[str(n)] = r
            log.append(f"{name:18s} {n:5d} tokens: {ms * 1e3:7.1f} us queued {r['tbs']:5.2f} TB/s"
                       f" ({r['bw_frac']:.0%} of {COPY_TBS}); in a CUDA graph {gms * 1e3:6.1f} us"
                       f" ({r['graph_bw_frac']:.0%}); torch ref {ref_ms * 1e3:7.1f} us queued,"
                       f" {ref_gms * 1e3:6.1f} us in a graph")
        torch.cuda.empty_cache()
    return result


def fused_metrics(fused: dict) -> dict:
    metrics = {}
    for name, by_n in fused.items():
        metrics[f"{name}_bw_frac_8k_tokens"] = by_n["8192"]["bw_frac"]
        # The kernel alone: queued timing can include the host's launch cost (~20-40 us a call).
        metrics[f"{name}_graph_bw_frac_8k_tokens"] = by_n["8192"]["graph_bw_frac"]
        metrics[f"{name}_graph_us_1_token"] = by_n["1"]["graph_us"]
        metrics[f"{name}_torch_graph_us_1_token"] = by_n["1"]["torch_graph_us"]
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", action="store_true", help="also time other configs and split counts")
    ap.add_argument("--fused-only", action="store_true", help="only the fused decoder ops (norm, act, rotary)")
    args = ap.parse_args()
    torch.manual_seed(0)
    log: list[str] = []
    command = "python bench/kernels_bench.py --out kernels.json" + (" --sweep" if args.sweep else "")
    if args.fused_only:
        fused = bench_fused_ops(log)
        metrics = fused_metrics(fused)
        write_result(args.out, command + " --fused-only", metrics, {"fused": fused}, log)
        return
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
    fused = bench_fused_ops(log)
    metrics.update(fused_metrics(fused))
    detail = {"decode": dec, "prefill": {str(k): v for k, v in pre.items()}, "mixed": mixed,
              "kv_write": {str(k): v for k, v in wr.items()}, "fused": fused}
    write_result(args.out, command, metrics, detail, log)


def write_result(out: Path, command: str, metrics: dict, detail: dict, log: list[str]) -> None:
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": command,
        "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
        "metrics": metrics,
        "detail": detail,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(log))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
