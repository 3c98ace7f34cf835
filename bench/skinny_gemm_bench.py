"""Skinny (decode) GEMM vs cuBLAS (`F.linear`) at Llama-3-8B shapes, inside CUDA graphs.

    python bench/skinny_gemm_bench.py --out skinny.json [--sweep] [--ms 1,2,4,8,16]

For each shape (qkv, o_proj, gate_up, down, lm_head) and M rows: 20 back-to-back calls of one
shape captured in one CUDA graph, each call on another copy of the weight (a ring of copies
> 250 MB, so no call finds its weight in the 50 MB L2), replayed; the time per call is the median
replay time / 20. TB/s = weight bytes / time. Then one whole decoder step's GEMMs at M = 1 and 8
(32 layers x (qkv, o, gate_up, down) + lm_head, 15 GB of distinct weights) in one graph:
cuBLAS, ours everywhere, and ours only where it won per shape ("hybrid").

`--sweep`: the configs below (inner loop, tile, warps, stages) x K splits, compiled in parallel
processes first; every candidate is checked against F.linear before it is timed; ranked at M = 1,
the best re-timed at the other M; prints the winners as a `SKINNY_CONFIGS` literal.

`--wide` (M in 17..64, the "dot" kind with x padded to 32 / 64 rows):

    python bench/skinny_gemm_bench.py --wide --stage compile   # fills Triton's cache only
    python bench/skinny_gemm_bench.py --wide --sweep-budget 150 [--deadline EPOCH] --out wide.json

times cuBLAS, then `WIDE_BASES` (+ `WIDE_SPLITS` for N <= 8192) at M = 32 and 64, one candidate
at a time for every (shape, M) in turn (so a stop at the time budget leaves every pair with the
same candidates tried; each candidate checked against cuBLAS's output first, a failure to compile
or run skips it); then the top 3 per M re-timed at M = 17, 24, 32 / 40, 48, 64 with cuBLAS beside
them; prints per shape and M cuBLAS us vs ours, the step sums (32 x (qkv + o + gate_up + down) +
lm_head) and the suggested `SKINNY_CONFIGS` entries for max_m 32 / 64 (None where cuBLAS won).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import skinny_gemm as sg
from kernels.skinny_gemm import SkinnyConfig, skinny_gemm

DT = torch.bfloat16
LAYERS = 32
SHAPES = {  # name -> (N, K), Llama-3-8B
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
PER_LAYER = ("qkv", "o_proj", "gate_up", "down")
CALLS = 20  # calls per graph
RING_BYTES = 256 << 20

# (kind, block_n, block_k, num_warps, num_stages); K splits are added per shape.
BASES = [
    ("dot", 16, 512, 4, 4), ("dot", 32, 256, 4, 4), ("dot", 32, 256, 4, 6),
    ("dot", 32, 512, 4, 3), ("dot", 32, 512, 4, 4),
    ("dot", 64, 128, 4, 4), ("dot", 64, 128, 4, 6), ("dot", 64, 128, 4, 8),
    ("dot", 64, 256, 4, 3), ("dot", 64, 256, 4, 4), ("dot", 64, 256, 4, 5), ("dot", 64, 256, 8, 4),
    ("dot", 64, 512, 4, 2), ("dot", 64, 512, 8, 2),
    ("dot", 128, 128, 4, 3), ("dot", 128, 128, 4, 4), ("dot", 128, 128, 4, 5), ("dot", 128, 128, 8, 4),
    ("dot", 128, 256, 8, 2), ("dot", 128, 256, 8, 3),
    ("fma", 4, 1024, 4, 2), ("fma", 8, 512, 4, 1), ("fma", 8, 512, 4, 2), ("fma", 8, 512, 4, 3),
    ("fma", 8, 1024, 4, 1), ("fma", 8, 1024, 4, 2), ("fma", 16, 256, 4, 2), ("fma", 16, 256, 4, 3),
    ("fma", 16, 512, 4, 1), ("fma", 16, 512, 4, 2), ("fma", 16, 512, 4, 3), ("fma", 16, 512, 8, 2),
    ("fma", 32, 256, 4, 2), ("fma", 32, 512, 8, 2),
    # wider tiles, fewer warps
    ("dot", 256, 64, 8, 4), ("dot", 256, 128, 8, 3), ("dot", 32, 128, 4, 8), ("dot", 128, 64, 4, 8),
    ("fma", 8, 256, 2, 2), ("fma", 4, 512, 2, 2), ("fma", 8, 512, 8, 2),
]
SPLITS = (2, 3, 4, 6, 8, 12, 16)


def fma_fits(b, m: int) -> bool:
    """fma kind at M rows: <= 128 fp32 accumulator registers a thread (else it spills)."""
    kind, bn, bk, w, _ = b
    return kind == "fma" and m <= 4 and m * bn * bk <= 128 * 32 * w


def base_config(b, split=1) -> SkinnyConfig:
    kind, bn, bk, w, st = b
    return SkinnyConfig(kind, bn, bk, split, w, st)


def split_options(n: int, k: int, b, sms: int = 132) -> list[int]:
    """K splits worth trying: no empty split, >= 2 K blocks each, <= 16 programs per SM."""
    _, bn, bk, _, _ = b
    tiles = -(-n // bn)
    out = [1]
    for s in SPLITS:
        per, eff = sg._split_plan(k, bk, s)
        if eff != s or per < 2 or tiles * s > 16 * sms or eff in out:
            continue
        if tiles >= 8 * sms:  # already >= 8 programs per SM: splitting only adds traffic
            continue
        out.append(eff)
    return out[:6]


# ----------------------------------------------------------------------------------------------
# parallel precompilation (fills Triton's disk cache; the timing process then only loads)


def _compile_jobs(jobs):
    import torch as t

    from kernels.skinny_gemm import SkinnyConfig as C
    from kernels.skinny_gemm import skinny_gemm as run

    errors = []
    for b, m, use_split in jobs:
        cfg = C(b[0], b[1], b[2], 2 if use_split else 1, b[3], b[4])
        n = max(16, 2 * cfg.block_n)
        k = cfg.block_k * 4  # multiples of 16, like every real shape: same specialization
        try:
            x = t.randn(m, k, device="cuda", dtype=t.bfloat16)
            w = t.randn(n, k, device="cuda", dtype=t.bfloat16)
            run(x, w, config=cfg)
            t.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 (out of shared memory, unsupported, ...)
            errors.append((b, m, use_split, repr(e)[:300]))
    return errors


def precompile(jobs, workers: int, timeout: float) -> list:
    if not jobs:
        return []
    t0 = time.time()
    chunks = [jobs[i::workers] for i in range(workers)]
    errors = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futs = [pool.submit(_compile_jobs, c) for c in chunks if c]
        done, pending = cf.wait(futs, timeout=timeout)
        for f in done:
            try:
                errors += f.result()
            except Exception as e:  # noqa: BLE001
                errors.append(("worker", repr(e)[:300]))
        for f in pending:
            f.cancel()
    print(f"precompiled {len(jobs)} variants in {time.time() - t0:.1f}s with {workers} processes, "
          f"{len(errors)} failed", flush=True)
    for e in errors[:40]:
        print("  compile failed:", e, flush=True)
    return errors


# ----------------------------------------------------------------------------------------------
# timing


def graph_us(fn, calls: int = CALLS, replays: int = 7) -> float:
    """Median per-call microseconds of `calls` back-to-back fn(i) captured in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times) * 1000.0 / calls


class Problem:
    def __init__(self, name: str, n: int, k: int):
        self.name, self.n, self.k = name, n, k
        wbytes = n * k * 2
        copies = max(1, -(-RING_BYTES // wbytes))
        self.weights = [torch.empty(n, k, dtype=DT, device="cuda").normal_(0, k**-0.5)
                        for _ in range(copies)]
        self.xs = {}
        self.wbytes = wbytes
        self.w32 = None

    def x(self, m: int) -> torch.Tensor:
        if m not in self.xs:
            self.xs[m] = torch.randn(m, self.k, dtype=DT, device="cuda")
        return self.xs[m]

    def cublas_us(self, m: int) -> float:
        x, ws = self.x(m), self.weights
        return graph_us(lambda i: F.linear(x, ws[i % len(ws)]))

    def ours_us(self, m: int, cfg: SkinnyConfig | None) -> float:
        x, ws = self.x(m), self.weights
        skinny_gemm(x, ws[0], config=cfg)  # eager first: workspace outside capture
        return graph_us(lambda i: skinny_gemm(x, ws[i % len(ws)], config=cfg))

    def check(self, m: int, cfg: SkinnyConfig | None) -> float:
        """Relative error vs F.linear in fp32 of the same bf16 inputs (poisoned output)."""
        x, w = torch.randn(m, self.k, dtype=DT, device="cuda"), self.weights[0]
        out = torch.full((m, self.n), float("nan"), dtype=DT, device="cuda")
        skinny_gemm(x, w, out=out, config=cfg)
        if self.w32 is None:
            self.w32 = w.float()
        ref = F.linear(x.float(), self.w32)
        if torch.isnan(out).any():
            return float("inf")
        return ((out.float() - ref).norm() / ref.norm()).item()

    def tbs(self, us: float) -> float:
        return self.wbytes / (us * 1e-6) / 1e12


def copy_tbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return 2 * a.numel() / (statistics.median(times) * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# sweep


def sweep_shape(p: Problem, ms: list[int], top: int, log, bad: set, deadline: float) -> dict:
    """bad: {(base, use_split)} that failed to compile; deadline: time.time() to stop timing at."""
    cands = []
    for b in BASES:
        for s in split_options(p.n, p.k, b):
            if (b, s > 1) not in bad:
                cands.append(base_config(b, s))
    res = {}
    t0 = time.time()
    for i, cfg in enumerate(cands):
        if time.time() > deadline:
            log(f"  {p.name}: sweep budget spent after {i}/{len(cands)} candidates")
            break
        b = (cfg.kind, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
        if (b, cfg.split_k > 1) in bad:
            continue
        try:
            t1 = time.time()
            err = p.check(1, cfg)
            if not err < 1e-2:
                log(f"  {p.name} {cfg.short()}: WRONG rel err {err:.3g}")
                continue
            if time.time() - t1 > 1.0:
                log(f"  {p.name} {cfg.short()}: first call took {time.time() - t1:.1f}s (compiled here?)")
            res[cfg] = {1: p.ours_us(1, cfg)}
        except Exception as e:  # noqa: BLE001
            bad.add((b, cfg.split_k > 1))
            log(f"  {p.name} {cfg.short()}: failed {repr(e)[:200]}")
    ranked = sorted(res, key=lambda c: res[c][1])
    log(f"  {p.name}: {len(res)}/{len(cands)} candidates timed at M=1 in {time.time() - t0:.1f}s; "
        f"best " + ", ".join(f"{c.short()} {res[c][1]:.2f}us" for c in ranked[:5]))
    tensor_core = [c for c in ranked if c.kind != "fma"][:top]
    fma = [c for c in ranked if c.kind == "fma"]  # the best few that fit each M, below
    for m in ms:
        if m == 1:
            continue
        fma_m = [c for c in fma if fma_fits((c.kind, c.block_n, c.block_k, c.num_warps, c.num_stages),
                                            m)][: max(3, top // 2)]
        for cfg in tensor_core + fma_m:
            try:
                err = p.check(m, cfg)
                if not err < 1e-2:
                    log(f"  {p.name} m={m} {cfg.short()}: WRONG rel err {err:.3g}")
                    continue
                res[cfg][m] = p.ours_us(m, cfg)
            except Exception as e:  # noqa: BLE001
                log(f"  {p.name} m={m} {cfg.short()}: failed {repr(e)[:200]}")
    best = {}
    for m in ms:
        timed = [(r[m], c) for c, r in res.items() if m in r]
        if timed:
            best[m] = min(timed, key=lambda t: t[0])[1]
    return {"results": res, "best": best}


def table_entries(best: dict[int, SkinnyConfig]) -> list[tuple[int, SkinnyConfig]]:
    """Per-M winners -> ((max_m, cfg), ...): M=1 -> 1, 2 -> 2, 4 -> 3..4, 8 -> 5..8, 16 -> 9..16."""
    entries: list[tuple[int, SkinnyConfig]] = []
    for m in sorted(best):
        cfg = best[m]
        if entries and entries[-1][1] == cfg:
            entries[-1] = (m, cfg)
        else:
            entries.append((m, cfg))
    if entries:
        entries[-1] = (16, entries[-1][1])
    return entries


def cfg_literal(c: SkinnyConfig) -> str:
    return f'C("{c.kind}", {c.block_n}, {c.block_k}, {c.split_k}, {c.num_warps}, {c.num_stages})'


# ----------------------------------------------------------------------------------------------
# whole decoder step


class Step:
    """The step's 129 GEMMs on distinct weights (15 GB at M = 1), allocated once."""

    def __init__(self):
        self.calls = []
        for layer in range(LAYERS + 1):
            for name in (PER_LAYER if layer < LAYERS else ("lm_head",)):
                n, k = SHAPES[name]
                self.calls.append((name, torch.empty(n, k, dtype=DT, device="cuda").normal_(0, k**-0.5)))

    def us(self, m: int, choice: dict[str, str], cfgs: dict[str, SkinnyConfig | None]) -> float:
        """One graph of all calls; choice[name] in {"cublas", "ours"}."""
        xs = {k: torch.randn(m, k, dtype=DT, device="cuda") for k in (4096, 14336)}

        def run(_):
            for name, w in self.calls:
                x = xs[w.shape[1]]
                if choice[name] == "ours":
                    skinny_gemm(x, w, config=cfgs[name])
                else:
                    F.linear(x, w)

        run(0)  # eager: workspaces
        return graph_us(run, calls=1, replays=9)


# ----------------------------------------------------------------------------------------------
# M in 17..64 ("--wide")

WIDE_MS = (32, 64)  # swept; the winners are re-timed at WIDE_RANGES
WIDE_RANGES = {32: (17, 24, 32), 64: (40, 48, 64)}  # table max_m -> M checked
# (block_n, block_k, num_warps, num_stages), split 1, every shape
WIDE_BASES = [
    (128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 6), (128, 64, 4, 6), (128, 64, 8, 6),
    (64, 128, 4, 4), (64, 256, 4, 3), (256, 64, 8, 4), (128, 128, 8, 3), (64, 128, 8, 4),
    (128, 64, 4, 8), (64, 64, 4, 8), (128, 64, 8, 4), (64, 256, 8, 3), (256, 64, 8, 3),
    (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 5), (128, 256, 8, 2), (256, 128, 8, 2),
    (64, 64, 4, 6), (32, 128, 4, 4), (128, 128, 4, 3), (64, 128, 4, 3), (32, 256, 4, 3),
    (256, 64, 4, 4), (128, 64, 4, 4), (32, 64, 4, 8),
]
# (block_n, block_k, num_warps, num_stages, split_k) for N <= 8192 (<= 64 tiles of 128 rows)
WIDE_SPLITS = [
    (128, 128, 8, 4, 2), (128, 128, 8, 4, 4), (128, 64, 4, 6, 2), (128, 64, 4, 6, 4),
    (64, 128, 4, 6, 2), (64, 256, 4, 3, 2), (256, 64, 8, 4, 4), (64, 128, 4, 4, 2),
    (128, 128, 4, 4, 2), (256, 64, 8, 4, 2),
]


def wide_candidates(n: int) -> list[SkinnyConfig]:
    base = [SkinnyConfig("dot", bn, bk, 1, w, st) for bn, bk, w, st in WIDE_BASES]
    if n > 8192:
        return base
    split = [SkinnyConfig("dot", bn, bk, s, w, st) for bn, bk, w, st, s in WIDE_SPLITS]
    return base[:8] + split[:4] + base[8:16] + split[4:] + base[16:]


def wide_compile_jobs() -> list:
    jobs = set()
    for n in (4096, 28672):
        for c in wide_candidates(n):
            for m in WIDE_MS:
                jobs.add((("dot", c.block_n, c.block_k, c.num_warps, c.num_stages), m, c.split_k > 1))
    return sorted(jobs)


def wide_key(c: SkinnyConfig, m: int):
    return (c.block_n, c.block_k, c.num_warps, c.num_stages, c.split_k > 1, sg.dot_block_m(m))


class WideProblem(Problem):
    def __init__(self, name: str, n: int, k: int):
        super().__init__(name, n, k)
        self.refs = {}

    def quick_check(self, m: int, cfg: SkinnyConfig) -> float:
        """Relative difference from cuBLAS's bf16 output (poisoned output; NaN -> inf)."""
        x = self.x(m)
        if m not in self.refs:
            self.refs[m] = F.linear(x, self.weights[0]).float()
        out = torch.full((m, self.n), float("nan"), dtype=DT, device="cuda")
        skinny_gemm(x, self.weights[0], out=out, config=cfg)
        ref = self.refs[m]
        if torch.isnan(out).any():
            return float("inf")
        return ((out.float() - ref).norm() / ref.norm()).item()


def wide_main(args) -> None:
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    t_start = time.time()
    hard = args.deadline if args.deadline else t_start + args.sweep_budget + 60
    jobs = wide_compile_jobs()
    err_path = Path(args.out + ".compile.json")
    if args.stage == "time":  # `--stage compile` ran before (its errors saved beside --out)
        errors = [tuple(e) for e in json.loads(err_path.read_text())] if err_path.exists() else []
        errors = [(tuple(e[0]), *e[1:]) for e in errors]
    else:
        errors = precompile(jobs, args.workers, timeout=max(10.0, min(150.0, hard - time.time() - 60)))
        err_path.write_text(json.dumps(errors))
    bad = {(e[0][1], e[0][2], e[0][3], e[0][4], e[2], sg.dot_block_m(e[1])) for e in errors if len(e) == 4}
    if args.stage == "compile":
        return
    import triton
    props = torch.cuda.get_device_properties(0)
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "device": {"name": props.name, "sms": props.multi_processor_count,
                               "torch": torch.__version__, "triton": triton.__version__},
                    "compile_errors": [repr(e) for e in errors]}
    log(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton "
        f"{triton.__version__}; {len(jobs)} wide variants, {len(errors)} failed to compile")
    names = args.shapes.split(",")
    probs = {name: WideProblem(name, *SHAPES[name]) for name in names}
    cub: dict[tuple[str, int], float] = {}
    for name, p in probs.items():
        for m in WIDE_MS:
            cub[name, m] = p.cublas_us(m)
    log("cuBLAS: " + ", ".join(f"{n} M={m} {v:.2f}us" for (n, m), v in cub.items()))
    sweep_end = min(time.time() + args.sweep_budget, hard - 45)
    res: dict[tuple[str, int], dict[SkinnyConfig, float]] = {(n, m): {} for n in names for m in WIDE_MS}
    cands = {n: wide_candidates(probs[n].n) for n in names}
    stopped = False
    for i in range(max(len(c) for c in cands.values())):
        for name in names:
            if i >= len(cands[name]):
                continue
            cfg = cands[name][i]
            for m in WIDE_MS:
                if time.time() > sweep_end:
                    stopped = True
                    break
                if wide_key(cfg, m) in bad:
                    continue
                p = probs[name]
                try:
                    err = p.quick_check(m, cfg)
                    if not err < 1e-2:
                        log(f"  {name} M={m} {cfg.short()}: WRONG rel err {err:.3g}")
                        continue
                    res[name, m][cfg] = p.ours_us(m, cfg)
                except Exception as e:  # noqa: BLE001 (OutOfResources, ...)
                    bad.add(wide_key(cfg, m))
                    log(f"  {name} M={m} {cfg.short()}: failed {repr(e)[:160]}")
            if stopped:
                break
        if stopped:
            log(f"sweep stopped at the time budget after candidate {i} [{time.time() - t_start:.0f}s]")
            break
        if i % 4 == 3:
            log(f"  [{time.time() - t_start:.0f}s] {i + 1} candidates: " + ", ".join(
                f"{n}/{m} {min(r.values()):.1f}" for (n, m), r in res.items() if r))
    report["sweep"] = {f"{n}/{m}": sorted(([c.short(), v] for c, v in r.items()), key=lambda t: t[1])
                       for (n, m), r in res.items()}
    for (n, m), r in res.items():
        top = sorted(r, key=r.get)[:5]
        log(f"{n:8} M={m}: cuBLAS {cub[n, m]:.2f}us; best " + ", ".join(f"{c.short()} {r[c]:.2f}"
                                                                     for c in top))
    # re-time the top 3 per swept M across its range, cuBLAS beside
    final: dict[tuple[str, int], dict] = {}
    chosen: dict[tuple[str, int], SkinnyConfig | None] = {}
    for name, p in probs.items():
        for mm, ms_r in WIDE_RANGES.items():
            r = res[name, mm]
            top = sorted(r, key=r.get)[:3]
            if not top or time.time() > hard - 20:
                continue
            per_cfg: dict[SkinnyConfig, dict[int, float]] = {c: {} for c in top}
            for m in ms_r:
                if time.time() > hard - 20:
                    break
                if (name, m) not in cub:
                    cub[name, m] = p.cublas_us(m)
                for c in top:
                    try:
                        if p.quick_check(m, c) < 1e-2:
                            per_cfg[c][m] = p.ours_us(m, c)
                    except Exception as e:  # noqa: BLE001
                        log(f"  {name} M={m} {c.short()}: failed {repr(e)[:160]}")
            full = [c for c in top if len(per_cfg[c]) == len(ms_r)] or top
            best = min(full, key=lambda c: sum(per_cfg[c].values()) / max(1, len(per_cfg[c])))
            wins = all(per_cfg[best].get(m, float("inf")) < cub.get((name, m), 0) for m in ms_r
                       if (name, m) in cub)
            chosen[name, mm] = best if wins else None
            for m in ms_r:
                if m in per_cfg[best]:
                    final[name, m] = {"cublas_us": cub[name, m], "ours_us": per_cfg[best][m],
                                      "config": best.short(), "max_m": mm}
    log(f"\n{'shape':8} {'M':>3} {'cuBLAS us':>10} {'ours us':>9} {'speedup':>7}  config")
    for (name, m), e in sorted(final.items(), key=lambda kv: (names.index(kv[0][0]), kv[0][1])):
        log(f"{name:8} {m:>3} {e['cublas_us']:>10.2f} {e['ours_us']:>9.2f} "
            f"{e['cublas_us'] / e['ours_us']:>7.3f}  {e['config']}")
    report["final"] = {f"{n}/{m}": e for (n, m), e in final.items()}
    if set(names) == set(SHAPES):
        for m in sorted({m for _, m in final}):
            if not all((n, m) in final for n in SHAPES):
                continue
            mult = {n: LAYERS if n in PER_LAYER else 1 for n in SHAPES}
            sc = sum(final[n, m]["cublas_us"] * mult[n] for n in SHAPES) / 1e3
            so = sum(final[n, m]["ours_us"] * mult[n] for n in SHAPES) / 1e3
            sh = sum(min(final[n, m]["ours_us"], final[n, m]["cublas_us"]) * mult[n] for n in SHAPES) / 1e3
            fl = sum(sg.skinny_gemm_floor_us(m, *SHAPES[n]) * mult[n] for n in SHAPES) / 1e3
            log(f"M={m} step sum: cuBLAS {sc:.3f} ms, ours {so:.3f} ms, best-of {sh:.3f} ms, "
                f"floor {fl:.3f} ms")
            report[f"step_m{m}"] = {"cublas_ms": sc, "ours_ms": so, "best_of_ms": sh, "floor_ms": fl}
    log("suggested SKINNY_CONFIGS entries (after the max_m = 16 ones):")
    for name in names:
        ents = ", ".join(f"({mm}, {cfg_literal(c) if c else 'None'})"
                         for mm in WIDE_RANGES if (name, mm) in chosen for c in [chosen[name, mm]])
        log(f"    {SHAPES[name]}: {ents}  # {name}")
    report["chosen"] = {f"{n}/{mm}": (c.short() if c else None) for (n, mm), c in chosen.items()}
    save(report, args.out, lines)
    if set(names) == set(SHAPES) and not args.no_step and time.time() < hard - 15 \
            and all((n, 64) in chosen for n in SHAPES):
        del probs
        torch.cuda.empty_cache()
        step = Step()
        cfgs = {n: chosen[n, 64] or res[n, 64] and min(res[n, 64], key=res[n, 64].get) for n in SHAPES}
        g_c = step.us(64, {n: "cublas" for n in SHAPES}, cfgs)
        g_o = step.us(64, {n: "ours" for n in SHAPES}, cfgs)
        g_h = step.us(64, {n: "ours" if chosen[n, 64] else "cublas" for n in SHAPES}, cfgs)
        log(f"M=64 one graph of the step's 129 GEMMs: cuBLAS {g_c / 1e3:.3f} ms, ours {g_o / 1e3:.3f} ms, "
            f"hybrid {g_h / 1e3:.3f} ms")
        report["graph_m64"] = {"cublas_ms": g_c / 1e3, "ours_ms": g_o / 1e3, "hybrid_ms": g_h / 1e3}
    save(report, args.out, lines)
    log(f"wrote {args.out} [{time.time() - t_start:.0f}s]")


def save(report: dict, path: str, lines: list[str]) -> None:
    report["log"] = lines
    Path(path).write_text(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="skinny_gemm.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ms", default="1,2,4,8,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--top", type=int, default=8, help="sweep: configs re-timed at M > 1")
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--no-step", action="store_true")
    ap.add_argument("--sweep-budget", type=float, default=120.0, help="seconds for timing candidates")
    ap.add_argument("--wide", action="store_true", help="M in 17..64: sweep + compare (see top)")
    ap.add_argument("--stage", choices=("compile", "time", "all"), default="all", help="--wide: compile only / time only (after compile) / both")
    ap.add_argument("--deadline", type=float, default=0.0, help="--wide: time.time() to be done by")
    args = ap.parse_args()
    if args.wide:
        wide_main(args)
        return
    ms = [int(v) for v in args.ms.split(",")]
    names = args.shapes.split(",")
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    t_start = time.time()
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "ms": ms}
    if args.sweep:
        jobs = [(b, 1, s) for b in BASES for s in (False, True)]
        jobs += [(b, m, s) for b in BASES if b[0] == "fma" for m in (2, 4) if fma_fits(b, m)
                 for s in (False, True)]
        errors = precompile(jobs, args.workers, timeout=150)
        report["compile_errors"] = [repr(e) for e in errors]
        bad = {(e[0], e[2]) for e in errors if len(e) == 4 and e[1] == 1}

    import triton
    props = torch.cuda.get_device_properties(0)
    report["device"] = {"name": props.name, "sms": props.multi_processor_count,
                        "torch": torch.__version__, "triton": triton.__version__}
    report["copy_tbs"] = copy_tbs()
    log(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton "
        f"{triton.__version__}; device copy {report['copy_tbs']:.2f} TB/s (read + write)")

    problems = {name: Problem(name, *SHAPES[name]) for name in names}
    chosen: dict[str, dict[int, SkinnyConfig]] = {}
    if args.sweep:
        report["sweep"] = {}
        sweep_end = time.time() + args.sweep_budget
        for i, (name, p) in enumerate(problems.items()):
            deadline = time.time() + 0.75 * (sweep_end - time.time()) / (len(problems) - i)
            sw = sweep_shape(p, ms, args.top, log, bad, deadline)
            chosen[name] = sw["best"]
            report["sweep"][name] = {
                "results": [{"config": dataclasses.asdict(c), "us": {str(m): v for m, v in r.items()}}
                            for c, r in sorted(sw["results"].items(), key=lambda kv: kv[1][1])],
                "best": {str(m): dataclasses.asdict(c) for m, c in sw["best"].items()},
            }
            log(f"  [{time.time() - t_start:.0f}s] {name} best: "
                + ", ".join(f"M={m} {c.short()}" for m, c in sw["best"].items()))
            save(report, args.out, lines)
        table = ["SKINNY_CONFIGS = {"]
        for name, best in chosen.items():
            ents = ", ".join(f"({mm}, {cfg_literal(c)})" for mm, c in table_entries(best))
            table.append(f"    {SHAPES[name]}: ({ents},),  # {name}")
        table.append("}")
        log("\n".join(table))
        report["table_literal"] = "\n".join(table)

    # final comparison: ours (sweep winner, else the module's table) vs cuBLAS
    log(f"\n{'shape':8} {'M':>3} {'cuBLAS us':>10} {'TB/s':>6} {'ours us':>9} {'TB/s':>6} "
        f"{'speedup':>7}  config")
    final = {}
    for name, p in problems.items():
        final[name] = {}
        for m in ms:
            cfg = chosen.get(name, {}).get(m) or sg.pick_config(m, p.n, p.k)
            err = p.check(m, cfg)
            cub = p.cublas_us(m)
            ours = p.ours_us(m, cfg)
            final[name][m] = {"cublas_us": cub, "ours_us": ours, "cublas_tbs": p.tbs(cub),
                              "ours_tbs": p.tbs(ours), "rel_err": err, "config": dataclasses.asdict(cfg),
                              "floor_us": sg.skinny_gemm_floor_us(m, p.n, p.k)}
            log(f"{name:8} {m:>3} {cub:>10.2f} {p.tbs(cub):>6.3f} {ours:>9.2f} {p.tbs(ours):>6.3f} "
                f"{cub / ours:>7.3f}  {cfg.short()} err={err:.1e}")
    report["final"] = {n: {str(m): v for m, v in r.items()} for n, r in final.items()}
    save(report, args.out, lines)
    del problems
    torch.cuda.empty_cache()

    step = None
    if set(names) == set(SHAPES):
        for m in [m for m in ms if m in (1, 8)]:
            sum_c = sum(final[n][m]["cublas_us"] * (LAYERS if n in PER_LAYER else 1) for n in SHAPES)
            sum_o = sum(final[n][m]["ours_us"] * (LAYERS if n in PER_LAYER else 1) for n in SHAPES)
            sum_h = sum(min(final[n][m]["ours_us"], final[n][m]["cublas_us"])
                        * (LAYERS if n in PER_LAYER else 1) for n in SHAPES)
            floor = sum(sg.skinny_gemm_floor_us(m, *SHAPES[n]) * (LAYERS if n in PER_LAYER else 1)
                        for n in SHAPES)
            log(f"M={m} step sum of per-shape times: cuBLAS {sum_c / 1e3:.3f} ms, ours {sum_o / 1e3:.3f} ms, "
                f"best-of {sum_h / 1e3:.3f} ms; floor at 3.08 TB/s {floor / 1e3:.3f} ms")
            entry = {"sum_cublas_ms": sum_c / 1e3, "sum_ours_ms": sum_o / 1e3,
                     "sum_best_of_ms": sum_h / 1e3, "floor_ms": floor / 1e3}
            if not args.no_step:
                cfgs = {n: chosen.get(n, {}).get(m) or sg.pick_config(m, *SHAPES[n]) for n in SHAPES}
                wins = {n: "ours" if final[n][m]["ours_us"] < final[n][m]["cublas_us"] else "cublas"
                        for n in SHAPES}
                if step is None:
                    step = Step()
                g_c = step.us(m, {n: "cublas" for n in SHAPES}, cfgs)
                g_o = step.us(m, {n: "ours" for n in SHAPES}, cfgs)
                g_h = step.us(m, wins, cfgs)
                log(f"M={m} one graph of the step's 129 GEMMs: cuBLAS {g_c / 1e3:.3f} ms, ours "
                    f"{g_o / 1e3:.3f} ms, hybrid {g_h / 1e3:.3f} ms ({wins})")
                entry.update(graph_cublas_ms=g_c / 1e3, graph_ours_ms=g_o / 1e3, graph_hybrid_ms=g_h / 1e3,
                             hybrid_choice=wins)
            report[f"step_m{m}"] = entry
            save(report, args.out, lines)
    save(report, args.out, lines)
    log(f"wrote {args.out} [{time.time() - t_start:.0f}s]")


if __name__ == "__main__":
    main()
