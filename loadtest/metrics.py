"""Figures from records: per request TTFT, inter-token gaps (ITL), TPOT, E2E, the first-to-second
token gap and the server's timings; per run percentiles, throughput, goodput under SLOs, errors by
status, and gaps over time. Times in milliseconds unless a name says otherwise.

Percentiles interpolate linearly between order statistics (numpy's default), so p50 of [1, 2, 3, 4]
is 2.5. A chunk carrying several tokens counts as one gap, as vLLM's benchmark counts it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields

from loadtest.clients import Record

QUANTILES = (50, 90, 95, 99)
SERVER_FIELDS = ("queue_ms", "prefill_ms", "kv_transfer_ms", "kv_transfer_bytes")


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats(values) -> dict:
    values = list(values)
    if not values:
        return {"count": 0}
    out = {"count": len(values), "mean": sum(values) / len(values), "min": min(values)}
    out.update({f"p{q}": percentile(values, q) for q in QUANTILES})
    out["max"] = max(values)
    return out


# -- one request -----------------------------------------------------------------------------------

def ttft_ms(r: Record) -> float | None:
    return (r.chunk_times[0] - r.start) * 1e3 if r.chunk_times else None


def gaps_ms(r: Record) -> list[float]:
    t = r.chunk_times
    return [(b - a) * 1e3 for a, b in zip(t, t[1:])]


def tpot_ms(r: Record) -> float | None:
    """(last token - first token) / (output tokens - 1)."""
    if len(r.chunk_times) < 2 or r.output_tokens < 2:
        return None
    return (r.chunk_times[-1] - r.chunk_times[0]) * 1e3 / (r.output_tokens - 1)


def e2e_ms(r: Record) -> float:
    return (r.end - r.start) * 1e3


@dataclass(frozen=True)
class SLO:
    """Service-level objectives of one request: TTFT, TPOT, every inter-token gap (`itl_ms` bounds the
    request's worst gap) and E2E, in ms; unset = not checked. A request meets them if it succeeded
    and every set bound holds."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, items) -> SLO:
        names = [f.name for f in fields(cls)]
        values = {}
        for item in items or ():
            key, eq, value = item.partition("=")
            if not eq or key not in names:
                raise ValueError(f"--slo {item!r}: expected NAME=MS with NAME one of {', '.join(names)}")
            values[key] = float(value)
        return cls(**values)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def met(self, r: Record) -> bool:
        if not r.ok or not r.chunk_times:
            return False
        checks = ((self.ttft_ms, lambda: ttft_ms(r)), (self.tpot_ms, lambda: tpot_ms(r) or 0.0),
                  (self.itl_ms, lambda: max(gaps_ms(r), default=0.0)), (self.e2e_ms, lambda: e2e_ms(r)))
        return all(bound is None or value() <= bound for bound, value in checks)


# -- one run ---------------------------------------------------------------------------------------

def latency(records: list[Record]) -> dict:
    """Percentiles of every per-request figure over successful records."""
    ok = [r for r in records if r.ok and r.chunk_times]
    out = {
        "ttft_ms": stats(ttft_ms(r) for r in ok),
        "itl_ms": stats(g for r in ok for g in gaps_ms(r)),
        "itl_after_first_ms": stats(g for r in ok for g in gaps_ms(r)[1:]),  # steady decoding only
        "tpot_ms": stats(v for v in map(tpot_ms, ok) if v is not None),
        "e2e_ms": stats(e2e_ms(r) for r in ok),
        "first_gap_ms": stats(gaps_ms(r)[0] for r in ok if len(r.chunk_times) > 1),
    }
    for name in SERVER_FIELDS:
        values = [r.server[name] for r in ok if name in r.server]
        if values:
            out[f"server_{name}"] = stats(values)
    return out


def burst_window(records: list[Record]) -> tuple[float, float] | None:
    """From the first burst request's start to the last one's end (s), if there were bursts."""
    burst = [r for r in records if r.kind == "burst" and r.start is not None and r.end is not None]
    if not burst:
        return None
    return min(r.start for r in burst), max(r.end for r in burst)


def gaps_in(records: list[Record], lo: float, hi: float) -> list[float]:
    """Gaps (ms) of main requests whose later token arrived in [lo, hi) seconds."""
    return [(b - a) * 1e3 for r in records if r.ok and r.kind == "main"
            for a, b in zip(r.chunk_times, r.chunk_times[1:]) if lo <= b < hi]


def gaps_over_time(records: list[Record], bin_s: float) -> list[dict]:
    """Main requests' gaps binned by the later token's arrival: per bin its start (s), count, p50, p99, max."""
    bins: dict[int, list[float]] = {}
    for r in records:
        if r.ok and r.kind == "main":
            for a, b in zip(r.chunk_times, r.chunk_times[1:]):
                bins.setdefault(int(b // bin_s), []).append((b - a) * 1e3)
    return [{"t_s": k * bin_s, "count": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v)}
            for k, v in sorted(bins.items())]


def summarize(records: list[Record], duration_s: float, slo: SLO, bin_s: float | None = None) -> dict:
    sent = [r for r in records if r.status != "not_sent"]
    ok = [r for r in sent if r.ok]
    good = [r for r in sent if slo.met(r)]
    duration_s = max(duration_s, 1e-9)
    summary = {
        "requests": {"total": len(records), "sent": len(sent), "ok": len(ok),
                     "by_status": dict(Counter(r.status for r in records))},
        "duration_s": duration_s,
        "throughput": {"requests_per_s": len(ok) / duration_s,
                       "input_tokens_per_s": sum(r.prompt_tokens for r in ok) / duration_s,
                       "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s},
        "goodput": {"slo": slo.as_dict(), "requests": len(good), "requests_per_s": len(good) / duration_s,
                    "fraction": len(good) / len(sent) if sent else 0.0},
    }
    for kind in ("main", "burst"):
        of_kind = [r for r in sent if r.kind == kind]
        if of_kind:
            summary[kind] = latency(of_kind)
            summary[kind]["goodput_fraction"] = sum(map(slo.met, of_kind)) / len(of_kind)
    window = burst_window(records)
    if window is not None:
        summary["burst_window_s"] = list(window)
        summary["main_itl_ms_during_bursts"] = stats(gaps_in(records, *window))
    summary["gaps_over_time"] = gaps_over_time(records, bin_s or max(duration_s / 60, 0.05))
    return summary
