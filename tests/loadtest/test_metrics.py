"""Metrics math against hand-computed cases: percentiles, per-request figures, goodput, errors, gaps over time."""
from __future__ import annotations

import pytest

from loadtest.clients import Record
from loadtest.metrics import SLO, gaps_ms, gaps_over_time, percentile, stats, summarize, tpot_ms, ttft_ms


def rec(index, start, chunks, kind="main", status="ok", tokens=None, prompt=10):
    return Record(index, kind, prompt, 8, start=start, end=(chunks[-1] if chunks else start) + 0.001,
                  chunk_times=list(chunks), output_tokens=len(chunks) if tokens is None else tokens, status=status)


def test_percentile_interpolates_linearly():
    values = [4, 1, 3, 2]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1 and percentile(values, 100) == 4
    assert percentile(values, 90) == pytest.approx(3.7)   # pos 2.7 -> 3 + 0.7 * (4 - 3)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7], 99) == 7
    with pytest.raises(ValueError):
        percentile([], 50)
    s = stats([10, 20, 30, 40, 50])
    assert (s["count"], s["mean"], s["p50"], s["p90"], s["max"]) == (5, 30, 30, 46, 50)
    assert stats([]) == {"count": 0}


def test_per_request_figures():
    r = rec(0, 1.0, [1.2, 1.25, 1.35, 1.6])
    assert ttft_ms(r) == pytest.approx(200)
    assert gaps_ms(r) == pytest.approx([50, 100, 250])
    assert tpot_ms(r) == pytest.approx(400 / 3)
    # a chunk of several tokens is one gap; TPOT divides by the tokens
    assert tpot_ms(rec(1, 0.0, [0.1, 0.5], tokens=5)) == pytest.approx(100)
    assert tpot_ms(rec(2, 0.0, [0.1])) is None and ttft_ms(rec(3, 0.0, [])) is None


def test_goodput_and_errors():
    records = [rec(0, 0.0, [0.1, 0.12, 0.14]),          # ttft 100, worst gap 20: meets both
               rec(1, 0.0, [0.6, 0.61]),                # ttft 600: misses ttft_ms=500
               rec(2, 0.0, [0.2, 0.3, 0.31]),           # worst gap 100: misses itl_ms=50
               rec(3, 0.0, [], status="UNAVAILABLE"),
               rec(4, 0.0, [], status="429"),
               Record(5, "main", 10, 8, status="not_sent")]
    slo = SLO.parse(["ttft_ms=500", "itl_ms=50"])
    assert slo == SLO(ttft_ms=500, itl_ms=50)
    assert [slo.met(r) for r in records] == [True, False, False, False, False, False]
    s = summarize(records, 2.0, slo)
    assert s["requests"] == {"total": 6, "sent": 5, "ok": 3,
                             "by_status": {"ok": 3, "UNAVAILABLE": 1, "429": 1, "not_sent": 1}}
    assert s["goodput"] == {"slo": {"ttft_ms": 500, "itl_ms": 50}, "requests": 1, "requests_per_s": 0.5,
                            "fraction": 0.2}
    assert s["throughput"]["requests_per_s"] == 1.5
    assert s["throughput"]["output_tokens_per_s"] == (3 + 2 + 3) / 2
    assert s["throughput"]["input_tokens_per_s"] == 30 / 2
    assert s["main"]["ttft_ms"]["count"] == 3 and s["main"]["ttft_ms"]["max"] == pytest.approx(600)
    assert s["main"]["itl_ms"]["count"] == 5 and s["main"]["itl_ms"]["max"] == pytest.approx(100)
    assert s["main"]["first_gap_ms"]["p50"] == pytest.approx(20)  # first gaps 20, 10, 100
    assert s["main"]["itl_after_first_ms"]["count"] == 2 and s["main"]["itl_after_first_ms"]["max"] == pytest.approx(20)
    with pytest.raises(ValueError, match="tpot_ms"):
        SLO.parse(["itl=50"])


def test_gaps_over_time_and_burst_window():
    main = rec(0, 0.0, [0.1, 0.2, 1.2, 1.3, 2.45])   # gaps 100 @0.2, 1000 @1.2, 100 @1.3, 1150 @2.45
    burst = rec(1, 1.0, [1.15, 1.2], kind="burst")
    bins = gaps_over_time([main, burst], 1.0)
    assert [(b["t_s"], b["count"]) for b in bins] == [(0.0, 1), (1.0, 2), (2.0, 1)]
    assert bins[1]["max"] == pytest.approx(1000) and bins[1]["p50"] == pytest.approx(550)
    assert bins[1]["p99"] == pytest.approx(100 + 0.99 * 900)
    s = summarize([main, burst], 2.5, SLO(), bin_s=1.0)
    assert s["burst_window_s"] == pytest.approx([1.0, 1.201])
    assert s["main_itl_ms_during_bursts"]["count"] == 1  # only the gap ending at 1.2 falls inside
    assert s["main_itl_ms_during_bursts"]["max"] == pytest.approx(1000)
    assert s["burst"]["ttft_ms"]["p50"] == pytest.approx(150)
    assert s["goodput"]["fraction"] == 1.0  # no SLO: every successful request counts
