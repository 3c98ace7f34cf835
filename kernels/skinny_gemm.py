"""Skinny GEMM for decode: `y[M, N] = x[M, K] @ W[N, K]^T`, M in 1..64.

At decode the activations are a handful of rows and the weights are everything: a Llama-3-8B
step reads 15.0 GB of bf16 weights and a few KB of activations, so the only number that matters
is how close the weight stream gets to the HBM read bandwidth. cuBLAS (`F.linear`) picks
`nvjet_*_128x8` tiles and split-K with a separate `splitKreduce` kernel for these shapes.

Design
------
* A program owns BLOCK_N output columns (= BLOCK_N rows of W) for all M rows and streams its
  `[BLOCK_N, BLOCK_K]` W tiles along K (a K range when split). W rows are contiguous in K, so
  every row segment is a coalesced 2*BLOCK_K-byte run. Accumulation is fp32; the output is
  rounded once to x's dtype.
* Rows past N are clamped to N-1 (and rows of x past M to M-1) instead of masked, so the W and x
  loads carry no mask unless K is not a multiple of BLOCK_K; the extra rows are computed and
  dropped at the store.
* Two inner loops (`SkinnyConfig.kind`):
  - "dot": `tl.dot(W_tile, x_tile^T)` with x padded to BLOCK_M rows (the product is
    [BLOCK_N, BLOCK_M]: W is the wide operand, as in cuBLAS's 128x8 tiles). Triton's software
    pipeliner keeps `num_stages - 1` W tiles in flight through shared memory (cp.async). Any
    M <= 64: BLOCK_M (a constexpr) is 16 for M <= 16, 32 for 17..32, 64 for 33..64
    (`dot_block_m`).
  - "fma": no tensor cores: an fp32 `[BLOCK_M, BLOCK_N, BLOCK_K]` elementwise accumulator,
    reduced over K once at the end (M <= 4; for M = 1 this is a plain GEMV in registers).
* Split-K in ONE kernel: when N / BLOCK_N programs cannot fill the 132 SMs (small N), the grid
  is (N tiles, SPLIT_K). Each program writes its fp32 partial tile to a workspace, then bumps the
  tile's semaphore (`atomic_add`, acq_rel, gpu scope); the program that arrives last sums the
  SPLIT_K partials in split order (deterministic: the result does not depend on which program
  finishes last), writes y, and resets the semaphore to 0, so the counters are always zero
  between calls. No second reduction kernel, no memset.
* CUDA graphs: launch parameters depend only on (M, N, K, strides, config); the workspace and
  semaphores are cached per device and never freed (a grown workspace keeps the old one alive,
  since a captured graph may still point at it). Allocate them by calling once outside capture
  (the engine's warm-up does); growing them during capture is refused. Calls that share the
  semaphores must not run concurrently on different streams.
* Configs: `SKINNY_CONFIGS[(N, K)]` holds the winners of `bench/skinny_gemm_bench.py --sweep`
  on an H100 (per M range), `SKINNY_CONFIGS_H200` the H200's; `skinny_gemm` takes the table of
  its device (`table_for`: by name, compute capability and SM count; no table on other devices);
  other shapes use `default_config` (the sweep's all-round winners, K split only when the tiles
  would leave most SMs idle).

What the sweep found (H100, bf16, Triton 3.6): at M = 1 the fma GEMV with narrow tiles (4-8 W
rows x 512-1024 K, 4 warps, 2 stages; ~1000-30000 programs, no split) beats every tensor-core
variant by 5-15%; at M >= 2-4 the "dot" kind (64x128 tiles, 6-8 stages, or 64x256 x 4) wins and
costs ~5% over M = 1. Split-K (semaphore reduction included) lost wherever the grid already had
>= ~64 programs; the TMA kind was correct but never the best.

Measured in CUDA graphs (20 back-to-back calls on distinct weights), H100, us per call, M = 1:
qkv 18.6 (cuBLAS 20.9), o_proj 13.8 (16.6), gate_up 76.4 (82.0), down 41.3 (44.6), lm_head
332 (374) -- 2.7-3.16 TB/s vs cuBLAS 2.0-2.87; one Llama-3-8B decode step's 129 GEMMs in one
graph: 5.10 ms vs cuBLAS 5.64 ms (floor at 3.08 TB/s: 4.88 ms); at M = 8: 5.35 vs 5.71 ms.
Ours won at every Llama-3-8B shape and every M in {1, 2, 4, 8, 16}.

M in 17..64 (`bench/skinny_gemm_bench.py --wide`: 38 configs a shape incl. K splits for N <= 8192,
28 for gate_up / lm_head, at M = 32 and 64; the top 3 re-timed at 17, 24, 32 / 40, 48, 64; H100,
Triton 3.6, CUDA graphs on rotating weight copies). us per call, cuBLAS -> ours (best config of
the range):
  M      qkv          o_proj       gate_up      down         lm_head
  17  21.7 -> 22.5  14.5 -> 16.7  83.3 -> 82.2  46.1 -> 45.1  380 -> 349
  24  21.8 -> 20.8  14.5 -> 14.7  84.1 -> 81.9  46.0 -> 44.9  380 -> 351
  32  21.7 -> 20.6  14.8 -> 14.8  84.5 -> 82.5  46.1 -> 44.9  382 -> 352
  40  22.2 -> 26.8  14.6 -> 20.2  88.4 -> 87.9  46.8 -> 49.6  384 -> 361
  48  22.0 -> 23.8  14.8 -> 17.6  87.9 -> 85.0  46.7 -> 47.9  384 -> 358
  64  20.8 -> 21.0  15.1 -> 15.7  87.2 -> 85.0  47.6 -> 46.9  388 -> 362
cuBLAS keeps about its M = 16 times (72-88% of 3.08 TB/s), while ours pays 3-10% over its M = 16
times for the 2-4x wider x tile, so the margins are small: lm_head wins by 6-9% everywhere,
gate_up by 1-3%, down at 17..32 and 64, qkv at 24..32; o_proj never (by > 0.5%).
A Llama-3-8B step at M = 64 (per-shape sums, 32 x (qkv + o + gate_up + down) + lm_head):
cuBLAS 5.85 ms, ours everywhere 5.76 ms, SKINNY_CONFIGS (ours only where it won) 5.73 ms,
floor 4.97 ms; one graph of the 129 GEMMs: cuBLAS 5.84 ms, ours everywhere 5.72 ms.
Not every shape wins, so `MAX_M` stays 16; `skinny_wins(M, N, K)` (or `pick_config(...)` not
None) says where a caller should use the kernel for 17..64 rows, and `skinny_gemm` with no
config is F.linear wherever it is False.
Seen in that sweep: with the same BLOCK_M, M just above a power of two is slower than M at it
(qkv 26.8 us at 40 vs 21.0 at 64): the padded x rows are clamped to row M-1, so up to 31 rows of
every program load the same row (likely one hot L2 slice); spreading them (row % M) is untried.
Shared memory is num_stages x (BLOCK_N + BLOCK_M) x BLOCK_K x 2 bytes (<= 227 KB on the H100).

`skinny_gemm_bytes` / `skinny_gemm_floor_us` give the bytes one call must move and the time
floor at a given bandwidth (the H100 here: ~3.0 TB/s copy, ~3.08 TB/s read-only).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_M = 16  # the engine (`engine.models.llama.linear`) sends batches of up to MAX_M rows here
KERNEL_MAX_M = 64  # what the kernels take (x padded / clamped to BLOCK_M in {16, 32, 64} rows)
logger = logging.getLogger("pdserve.kernels")

DOT_BLOCK_M = 16  # tl.dot needs >= 16 rows: x is padded (clamped rows) to 16 for M <= 16
H100_READ_BW = 3.08e12  # bytes/s, read-only stream on the H100 lent here


@dataclass(frozen=True)
class SkinnyConfig:
    kind: str  # "dot" | "fma"
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def short(self) -> str:
        return (f"{self.kind}:n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}st{self.num_stages}")


C = SkinnyConfig
# (N, K) -> ((max_m, config), ...), ascending max_m. The entries up to max_m = 16 cover M <= 16
# (unchanged since that sweep); the entries after them cover M in 17..64 (`--wide` sweep, see the
# module docstring), where a config of None means cuBLAS was as fast or faster there
# (`pick_config` returns None, `skinny_gemm` falls back to F.linear). A range between a measured
# loss and a measured win goes to cuBLAS. A shape without entries above 16 also falls back.
# From `bench/skinny_gemm_bench.py --sweep` on an H100 (1073 candidates a shape at M = 1, the best
# re-timed at M = 2, 4, 8, 16); where two configs were within ~0.5% the simpler table won. Split-K
# never won at these shapes: the fma kind's narrow tiles already give >= 500 programs.
SKINNY_CONFIGS: dict[tuple[int, int], tuple[tuple[int, SkinnyConfig | None], ...]] = {
    (6144, 4096): ((1, C("fma", 4, 1024, 1, 4, 2)), (16, C("dot", 64, 256, 1, 4, 4)),
                   (23, None), (32, C("dot", 64, 256, 1, 4, 3)), (64, None)),  # qkv
    (4096, 4096): ((2, C("fma", 8, 512, 1, 4, 2)), (16, C("dot", 64, 128, 1, 4, 6)),
                   (64, None)),  # o_proj
    (28672, 4096): ((1, C("fma", 4, 1024, 1, 4, 2)), (4, C("dot", 64, 128, 1, 4, 8)),
                    (16, C("dot", 128, 128, 1, 8, 4)),
                    (32, C("dot", 128, 128, 1, 8, 4)), (40, None),
                    (64, C("dot", 128, 128, 1, 8, 4))),  # gate_up
    (4096, 14336): ((1, C("fma", 8, 512, 1, 8, 2)), (2, C("fma", 4, 512, 1, 2, 2)),
                    (16, C("dot", 64, 128, 1, 4, 8)),
                    (32, C("dot", 64, 256, 2, 4, 3)), (63, None),
                    (64, C("dot", 64, 128, 2, 4, 6))),  # down
    (128256, 4096): ((1, C("fma", 4, 1024, 1, 4, 2)), (16, C("dot", 64, 128, 1, 4, 8)),
                     (32, C("dot", 128, 128, 1, 8, 3)),
                     (64, C("dot", 128, 128, 1, 8, 4))),  # lm_head
}
SKINNY_CONFIGS_H100 = SKINNY_CONFIGS

# The H200 (`bench/skinny_gemm_bench.py --sweep --no-step` on an H200, 2026-12-02, Triton 3.6;
# bench/results/skinny_gemm_h200.json): each config is the sweep's winner for its M range (its
# `table_literal`), except that where the file's final re-timing (`final`: the winner vs cuBLAS at
# M = 1, 2, 4, 8, 16) had cuBLAS faster, the range is None (cuBLAS), and a range between a measured
# loss and a measured win goes to cuBLAS, as above. So: qkv wins at 1 and 16 only, gate_up at 1
# only, down everywhere but 2 (3 unmeasured, between the loss at 2 and the win at 4), o_proj and
# lm_head everywhere. M in 17..64 was not swept on the H200: cuBLAS (MAX_M = 16 keeps the engine
# from sending those rows here anyway).
SKINNY_CONFIGS_H200: dict[tuple[int, int], tuple[tuple[int, SkinnyConfig | None], ...]] = {
    (6144, 4096): ((1, C("fma", 4, 512, 1, 2, 2)), (15, None), (16, C("dot", 64, 128, 1, 4, 6)),
                   (64, None)),  # qkv
    (4096, 4096): ((2, C("fma", 4, 512, 1, 2, 2)), (16, C("dot", 64, 128, 1, 4, 8)), (64, None)),  # o_proj
    (28672, 4096): ((1, C("fma", 4, 512, 1, 2, 2)), (64, None)),  # gate_up
    (4096, 14336): ((1, C("fma", 8, 512, 1, 8, 2)), (3, None), (8, C("dot", 64, 256, 2, 4, 4)),
                    (16, C("dot", 64, 128, 2, 4, 6)), (64, None)),  # down
    (128256, 4096): ((1, C("fma", 16, 256, 1, 4, 2)), (4, C("dot", 256, 128, 1, 8, 3)),
                     (16, C("dot", 128, 128, 1, 4, 3)), (64, None)),  # lm_head
}
del C

SkinnyTable = dict[tuple[int, int], tuple[tuple[int, "SkinnyConfig | None"], ...]]


@dataclass(frozen=True)
class DeviceTable:
    """A tuned table and the device it was swept on: a GPU whose name names `family`, with compute
    capability `capability` and `sms` SMs."""

    family: str  # a word of torch.cuda.get_device_name(), e.g. "H200" ("NVIDIA H200"; not "GH200")
    capability: tuple[int, int]
    sms: int
    configs: SkinnyTable


DEVICE_TABLES = (
    DeviceTable("H200", (9, 0), 132, SKINNY_CONFIGS_H200),
    DeviceTable("H100", (9, 0), 132, SKINNY_CONFIGS_H100),
)
# Any other device (a GH200, an H100 PCIe with 114 SMs, an A100, ...): no table. `pick_config`
# then gives `default_config` (the sweeps' all-round winners, K split by the device's SM count)
# for M <= 16 and cuBLAS above; a device's own sweep (bench/skinny_gemm_bench.py --sweep) is what
# would give it a table.
FALLBACK_TABLE: SkinnyTable = {}


def select_table(name: str, capability: tuple[int, int], sms: int) -> SkinnyTable:
    """The tuned table for a CUDA device described by its name, compute capability and SM count
    (all three must match a `DEVICE_TABLES` entry), else `FALLBACK_TABLE`."""
    words = set(re.split(r"[^A-Za-z0-9]+", name.upper()))
    for entry in DEVICE_TABLES:
        if entry.family in words and tuple(capability) == entry.capability and sms == entry.sms:
            return entry.configs
    return FALLBACK_TABLE


_TABLES: dict[torch.device, SkinnyTable] = {}


def table_for(device: torch.device) -> SkinnyTable:
    """The table of `device` (cached). CPU (the Triton interpreter, for tests) gets the H100's,
    as `_sm_count` pretends an H100 there."""
    if device.type != "cuda":
        return SKINNY_CONFIGS_H100
    if device not in _TABLES:
        name = torch.cuda.get_device_name(device)
        table = select_table(name, torch.cuda.get_device_capability(device), _sm_count(device))
        family = next((e.family for e in DEVICE_TABLES if e.configs is table), None)
        logger.info("skinny GEMM on %s: %s", name, f"the {family} table" if family else
                    "no tuned table (default configs for <= 16 rows, cuBLAS above)")
        _TABLES[device] = table
    return _TABLES[device]


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _finish(part, M, N, y_ptr, stride_ym, ws_ptr, cnt_ptr, pid_n, pid_k, SPLIT_K,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_SPLIT: tl.constexpr):
    """part: fp32 [BLOCK_M, BLOCK_N] for rows 0..BLOCK_M-1, columns pid_n*BLOCK_N + 0..BLOCK_N-1."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_bn = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_bn
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if USE_SPLIT:
        TILE: tl.constexpr = BLOCK_M * BLOCK_N
        loc = offs_m[:, None] * BLOCK_N + offs_bn[None, :]
        base = ws_ptr + (pid_n * SPLIT_K).to(tl.int64) * TILE
        tl.store(base + pid_k * TILE + loc, part)
        tl.debug_barrier()  # every thread's partial is written before the semaphore moves
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last program of this tile: reduce in split order
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(base + s * TILE + loc, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call
    else:
        tl.store(y_ptrs, part.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit(do_not_specialize=["M", "iters_per_split", "SPLIT_K"])
def _skinny_dot_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, iters_per_split, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_SPLIT: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    xrows = tl.minimum(tl.arange(0, BLOCK_M), M - 1)
    first = pid_k * iters_per_split
    n_iters = tl.minimum(iters_per_split, tl.cdiv(K, BLOCK_K) - first)
    offs_k = first * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    x_ptrs = x_ptr + xrows[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(n_iters):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            xv = tl.load(x_ptrs)
        else:
            kmask = offs_k < K
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
            xv = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(w, tl.trans(xv), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(xv), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        offs_k += BLOCK_K
    _finish(tl.trans(acc), M, N, y_ptr, stride_ym, ws_ptr, cnt_ptr, pid_n, pid_k, SPLIT_K,
            BLOCK_M, BLOCK_N, USE_SPLIT)


@triton.jit(do_not_specialize=["M", "iters_per_split", "SPLIT_K"])
def _skinny_fma_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, iters_per_split, SPLIT_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_SPLIT: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    first = pid_k * iters_per_split
    n_iters = tl.minimum(iters_per_split, tl.cdiv(K, BLOCK_K) - first)
    offs_k = first * BLOCK_K + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    if BLOCK_M == 1:  # GEMV: a 2-D accumulator, x broadcast along N
        x_ptrs = x_ptr + offs_k
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for _ in range(n_iters):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                xv = tl.load(x_ptrs)
            else:
                kmask = offs_k < K
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
                xv = tl.load(x_ptrs, mask=kmask, other=0.0)
            acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            offs_k += BLOCK_K
        part = tl.sum(acc2, axis=1)[None, :]
    else:
        xrows = tl.minimum(tl.arange(0, BLOCK_M), M - 1)
        x_ptrs = x_ptr + xrows[:, None] * stride_xm + offs_k[None, :]
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        for _ in range(n_iters):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                xv = tl.load(x_ptrs)
            else:
                kmask = offs_k < K
                w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
                xv = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            acc3 += w.to(tl.float32)[None, :, :] * xv.to(tl.float32)[:, None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            offs_k += BLOCK_K
        part = tl.sum(acc3, axis=2)
    _finish(part, M, N, y_ptr, stride_ym, ws_ptr, cnt_ptr, pid_n, pid_k, SPLIT_K,
            BLOCK_M, BLOCK_N, USE_SPLIT)


_KERNELS = {"dot": _skinny_dot_kernel, "fma": _skinny_fma_kernel}


# ----------------------------------------------------------------------------------------------
# host side

_SM_COUNT: dict[torch.device, int] = {}
_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # grown-out workspaces a graph may still use


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend H100
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _workspace(device: torch.device, ws_elems: int, n_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    cur = _WORKSPACES.get(device)
    if cur is not None and cur[0].numel() >= ws_elems and cur[1].numel() >= n_counters:
        return cur
    if device.type == "cuda":
        assert not torch.cuda.is_current_stream_capturing(), (
            "skinny_gemm: split-K workspace must be allocated before CUDA graph capture "
            "(call skinny_gemm once eagerly with this shape first)")
    ws_elems = max(ws_elems, 1 << 16, cur[0].numel() if cur is not None else 0)
    n_counters = max(n_counters, 1024, cur[1].numel() if cur is not None else 0)
    if cur is not None:
        _RETIRED.append(cur)
    new = (torch.empty(ws_elems, dtype=torch.float32, device=device),
           torch.zeros(n_counters, dtype=torch.int32, device=device))
    _WORKSPACES[device] = new
    return new


def _split_plan(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(iterations per split, effective splits): no split is left empty."""
    total = triton.cdiv(K, block_k)
    per = triton.cdiv(total, max(1, min(split_k, total)))
    return per, triton.cdiv(total, per)


def default_config(M: int, N: int, K: int, sm_count: int = 132) -> SkinnyConfig:
    """Shapes without a tuned entry: the sweep's all-round winners (fma GEMV for M <= 2, else
    64 x 128 tensor-core tiles 8 stages deep), K split only while there are fewer programs than
    a third of the SMs (more splits cost more than the idle SMs they fill, in the sweep) and every
    split keeps >= 2 K blocks."""
    if M == 1:
        kind, block_n, warps, stages, pref = "fma", 8, 4, 2, (512, 256, 128)
    elif M == 2:
        kind, block_n, warps, stages, pref = "fma", 4, 2, 2, (512, 256, 128)
    else:
        kind, block_n, warps, stages, pref = "dot", 64, 4, 8, (128, 64)
    block_k = next((b for b in pref if K % b == 0), pref[1] if K >= pref[1] else pref[-1])
    tiles = triton.cdiv(N, block_n)
    k_iters = triton.cdiv(K, block_k)
    split = 1
    while tiles * split < max(1, sm_count // 3) and k_iters >= 2 * (split * 2):
        split *= 2
    return SkinnyConfig(kind, block_n, block_k, split, num_warps=warps, num_stages=stages)


def dot_block_m(M: int) -> int:
    """Rows the "dot" kind pads x to (a tl.dot operand needs >= 16)."""
    return DOT_BLOCK_M if M <= DOT_BLOCK_M else (32 if M <= 32 else 64)


def pick_config(M: int, N: int, K: int, sm_count: int = 132,
                table: SkinnyTable | None = None) -> SkinnyConfig | None:
    """The tuned config for M rows of this shape; None where cuBLAS is the faster choice (a
    table entry of None, an untuned shape at M > 16, or M > KERNEL_MAX_M). `table`: a device's
    (`table_for`); None = the H100's `SKINNY_CONFIGS`."""
    for max_m, cfg in (SKINNY_CONFIGS if table is None else table).get((N, K), ()):
        if M <= max_m:
            return cfg
    if M > DOT_BLOCK_M:
        return None
    return default_config(M, N, K, sm_count)


def skinny_wins(M: int, N: int, K: int) -> bool:
    """Whether skinny_gemm (with its table) beats cuBLAS for M rows of [N, K]: always for
    1 <= M <= 16; for 17..64 only where `SKINNY_CONFIGS` has a config (not None)."""
    return 0 < M <= KERNEL_MAX_M and pick_config(M, N, K) is not None


def _check(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> None:
    assert x.dim() == 2 and weight.dim() == 2, (tuple(x.shape), tuple(weight.shape))
    assert x.shape[1] == weight.shape[1], (tuple(x.shape), tuple(weight.shape))
    assert x.shape[0] <= KERNEL_MAX_M, f"skinny_gemm is for M <= {KERNEL_MAX_M} rows, got {x.shape[0]}"
    assert x.dtype == weight.dtype, (x.dtype, weight.dtype)
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    assert x.device == weight.device, (x.device, weight.device)
    assert weight.is_contiguous(), "weight must be contiguous [N, K] (nn.Linear layout)"
    assert x.stride(1) == 1 or x.shape[1] == 1, f"x rows must be contiguous, strides {x.stride()}"
    if out is not None:
        assert out.shape == (x.shape[0], weight.shape[0]), (tuple(out.shape), tuple(x.shape),
                                                             tuple(weight.shape))
        assert out.dtype == x.dtype and out.device == x.device, (out.dtype, out.device)
        assert out.stride(1) == 1 or out.shape[1] == 1, f"out rows must be contiguous: {out.stride()}"


def skinny_gemm(
    x: torch.Tensor,  # [M, K], M <= 64, rows contiguous (row stride free)
    weight: torch.Tensor,  # [N, K] contiguous, x's dtype
    out: torch.Tensor | None = None,  # [M, N], x's dtype, rows contiguous
    config: SkinnyConfig | None = None,  # None: SKINNY_CONFIGS / default_config
) -> torch.Tensor:
    """`x @ weight.T` (= F.linear(x, weight)) with fp32 accumulation, for decode-sized M.
    With config None, where `pick_config` says cuBLAS is faster (see `skinny_wins`) this is
    F.linear itself."""
    _check(x, weight, out)
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    cfg = config if config is not None else pick_config(M, N, K, _sm_count(x.device), table_for(x.device))
    if cfg is None:  # cuBLAS wins here
        if out is None:
            return F.linear(x, weight)
        return out.copy_(F.linear(x, weight))
    kernel = _KERNELS[cfg.kind]
    if cfg.kind == "fma":
        assert M <= 4, f"the fma kind handles M <= 4, got {M}"
        block_m = triton.next_power_of_2(M)
    else:
        block_m = dot_block_m(M)
    per, split = _split_plan(K, cfg.block_k, cfg.split_k)
    tiles = triton.cdiv(N, cfg.block_n)
    use_split = split > 1
    if use_split:
        ws, cnt = _workspace(x.device, tiles * split * block_m * cfg.block_n, tiles)
    else:
        ws, cnt = out, out  # unused
    kernel[(tiles, split)](
        x, weight, out, ws, cnt,
        M, N, K, x.stride(0), out.stride(0), per, split,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=K % cfg.block_k == 0, USE_SPLIT=use_split, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def skinny_gemm_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def skinny_gemm_bytes(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The fewest bytes one call moves: W and x read once, y written once."""
    size = torch.empty((), dtype=dtype).element_size()
    return (N * K + M * K + M * N) * size


def skinny_gemm_floor_us(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16,
                         bandwidth: float = H100_READ_BW) -> float:
    """Time floor in microseconds at `bandwidth` bytes/s."""
    return skinny_gemm_bytes(M, N, K, dtype) / bandwidth * 1e6
