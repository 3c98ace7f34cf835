"""The skinny GEMM's tuning table is chosen per device; the H200's entries follow its sweep.

CPU: the selection by (name, capability, SM count) with torch.cuda mocked, the H200 table checked
against bench/results/skinny_gemm_h200.json (configs measured there, cuBLAS wherever the final
re-timing had cuBLAS faster) and for validity at its shapes (kinds, ranges, shared memory, K
splits). CUDA: every H200 entry against F.linear at its real shape, and the live device's table.
"""
import json
import pathlib

import pytest
import torch

import kernels.skinny_gemm as sg
from kernels.skinny_gemm import (
    DEVICE_TABLES,
    FALLBACK_TABLE,
    KERNEL_MAX_M,
    SKINNY_CONFIGS,
    SKINNY_CONFIGS_H100,
    SKINNY_CONFIGS_H200,
    SkinnyConfig,
    _split_plan,
    default_config,
    dot_block_m,
    pick_config,
    select_table,
    table_for,
)

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "skinny_gemm_h200.json"
SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block (opt-in)
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("name, capability, sms, expected", [
    ("NVIDIA H200", (9, 0), 132, "H200"),
    ("NVIDIA H100 80GB HBM3", (9, 0), 132, "H100"),
    ("NVIDIA H100 NVL", (9, 0), 132, "H100"),
    ("NVIDIA H100 PCIe", (9, 0), 114, None),  # not the swept SM count
    ("NVIDIA GH200 480GB", (9, 0), 132, None),  # "GH200" is not the word "H200"
    ("NVIDIA A100-SXM4-80GB", (8, 0), 108, None),
    ("NVIDIA H200", (10, 0), 132, None),  # a name with the wrong capability (a mocked oddity)
    ("NVIDIA GeForce RTX 4090", (8, 9), 128, None),
])
def test_table_selected_by_name_capability_and_sms(name, capability, sms, expected):
    table = select_table(name, capability, sms)
    want = {"H200": SKINNY_CONFIGS_H200, "H100": SKINNY_CONFIGS_H100, None: FALLBACK_TABLE}[expected]
    assert table is want


def test_table_for_a_mocked_cuda_device(monkeypatch):
    props = {"NVIDIA H200": ((9, 0), 132), "NVIDIA H100 80GB HBM3": ((9, 0), 132), "NVIDIA L40S": ((8, 9), 142)}
    current = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: current["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: props[current["name"]][0])
    monkeypatch.setattr(sg, "_sm_count", lambda device: props[current["name"]][1])
    for index, (name, want) in enumerate([("NVIDIA H200", SKINNY_CONFIGS_H200),
                                          ("NVIDIA H100 80GB HBM3", SKINNY_CONFIGS_H100),
                                          ("NVIDIA L40S", FALLBACK_TABLE)]):
        monkeypatch.setattr(sg, "_TABLES", {})
        current["name"] = name
        device = torch.device("cuda", index)
        assert table_for(device) is want
        current["name"] = "something else"  # cached per device: asked once
        assert table_for(device) is want
    assert table_for(torch.device("cpu")) is SKINNY_CONFIGS_H100  # the interpreter pretends an H100


def test_pick_config_by_table():
    n, k = SHAPES["gate_up"]
    assert pick_config(1, n, k, table=SKINNY_CONFIGS_H200) == SkinnyConfig("fma", 4, 512, 1, 2, 2)
    assert pick_config(8, n, k, table=SKINNY_CONFIGS_H200) is None  # cuBLAS won at 2..16 on the H200
    assert pick_config(8, n, k) == pick_config(8, n, k, table=SKINNY_CONFIGS_H100) is not None
    assert SKINNY_CONFIGS is SKINNY_CONFIGS_H100  # the old name keeps the H100's table
    # No table: the default configs up to 16 rows, cuBLAS above, on any shape.
    for m in (1, 2, 3, 8, 16):
        assert pick_config(m, n, k, 114, table=FALLBACK_TABLE) == default_config(m, n, k, 114)
    assert pick_config(17, n, k, table=FALLBACK_TABLE) is None
    for entry in DEVICE_TABLES:
        assert entry.configs is not FALLBACK_TABLE and entry.configs


def _valid(cfg: SkinnyConfig, max_m: int, n: int, k: int) -> None:
    assert cfg.kind in ("dot", "fma")
    for v in (cfg.block_n, cfg.block_k, cfg.num_warps):
        assert v & (v - 1) == 0, cfg  # Triton block shapes and warps: powers of two
    assert cfg.block_n <= n and cfg.block_k <= k and k % cfg.block_k == 0, cfg  # no masked K tail here
    assert 1 <= cfg.num_stages <= 8 and 1 <= cfg.split_k
    per, splits = _split_plan(k, cfg.block_k, cfg.split_k)
    assert splits == cfg.split_k and per * cfg.block_k * splits >= k, cfg  # no empty split
    if cfg.kind == "fma":
        assert max_m <= 4, cfg  # the fma kind takes M <= 4
    else:
        rows = dot_block_m(max_m)
        assert cfg.num_stages * (cfg.block_n + rows) * cfg.block_k * 2 <= SMEM_BYTES, cfg


def test_h200_entries_valid_for_their_shapes():
    assert set(SKINNY_CONFIGS_H200) == set(SHAPES.values()) == set(SKINNY_CONFIGS_H100)
    for (n, k), entries in SKINNY_CONFIGS_H200.items():
        bounds = [m for m, _ in entries]
        assert bounds == sorted(set(bounds)) and bounds[-1] == KERNEL_MAX_M, (n, k)
        assert all(cfg is None for m, cfg in entries if m > 16), (n, k)  # 17..64 not swept on the H200
        assert all(pick_config(m, n, k, table=SKINNY_CONFIGS_H200) is None for m in range(17, KERNEL_MAX_M + 1))
        lo = 1
        for max_m, cfg in entries:
            if cfg is not None:
                _valid(cfg, max_m, n, k)
            for m in range(lo, max_m + 1):
                assert pick_config(m, n, k, table=SKINNY_CONFIGS_H200) is cfg
            lo = max_m + 1


def test_h200_table_follows_its_sweep():
    """Each config was measured on the H200; at each re-timed M the table holds the sweep's winner
    where it beat cuBLAS and None (cuBLAS) where it did not."""
    report = json.loads(RESULTS.read_text())
    assert report["device"]["name"] == "NVIDIA H200" and report["device"]["sms"] == 132
    for name, (n, k) in SHAPES.items():
        measured = [SkinnyConfig(**r["config"]) for r in report["sweep"][name]["results"]]
        for _, cfg in SKINNY_CONFIGS_H200[(n, k)]:
            assert cfg is None or cfg in measured, (name, cfg)
        for m, row in report["final"][name].items():
            cfg = pick_config(int(m), n, k, table=SKINNY_CONFIGS_H200)
            if row["ours_us"] < row["cublas_us"]:
                assert cfg == SkinnyConfig(**row["config"]), (name, m)
            else:
                assert cfg is None, (name, m, row["ours_us"], row["cublas_us"])
        # Between measured M: a range is ours only if both measured ends it touches say ours.
        times = {int(m): r["ours_us"] < r["cublas_us"] for m, r in report["final"][name].items()}
        points = sorted(times)
        for a, b in zip(points, points[1:]):
            for m in range(a + 1, b):
                if pick_config(m, n, k, table=SKINNY_CONFIGS_H200) is not None:
                    assert times[a] and times[b], (name, m)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(SHAPES))
def test_gpu_h200_entries_match_linear(name):
    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(n, k, generator=g, device="cuda") / k**0.5).to(torch.bfloat16)
    for max_m, cfg in SKINNY_CONFIGS_H200[(n, k)]:
        if cfg is None:
            continue
        for m in sorted({1, max_m} if cfg.kind == "dot" else {max_m}):
            x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
            got = sg.skinny_gemm(x, w, config=cfg).float()
            ref = torch.nn.functional.linear(x.float(), w.float())
            err = (got - ref).abs().max().item() / ref.abs().max().item()
            assert err < 2e-2, (name, m, cfg, err)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_live_device_table():
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    want = select_table(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device),
                        props.multi_processor_count)
    assert table_for(device) is want
    if torch.cuda.get_device_name(device) == "NVIDIA H200":
        assert want is SKINNY_CONFIGS_H200
