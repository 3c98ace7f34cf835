"""PNG plots (matplotlib, Agg): ITL over time with burst markers, TTFT and ITL CDFs, latency vs
throughput for sweeps, and several runs side by side."""
from __future__ import annotations

import os

from loadtest import metrics
from loadtest.report import records_of


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values, label: str) -> None:
    values = sorted(values)
    if values:
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)


def _burst_marks(ax, res: dict) -> None:
    for burst in res["config"].get("workload", {}).get("bursts", ()):
        ax.axvline(burst["at"], color="red", linestyle="--", linewidth=1)
    window = res["summary"].get("burst_window_s")
    if window:
        ax.axvspan(*window, color="red", alpha=0.08, label="burst requests in flight")


def itl_over_time(res: dict, path: str) -> str:
    plt = _pyplot()
    records = records_of(res)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    points = [(b, (b - a) * 1e3) for r in records if r.ok and r.kind == "main"
              for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    if points:
        ax.scatter(*zip(*points), s=2, alpha=0.3, label="each gap")
    bins = res["summary"]["gaps_over_time"]
    if bins:
        ax.plot([b["t_s"] for b in bins], [b["p99"] for b in bins], color="black", label="p99 per bin")
        ax.plot([b["t_s"] for b in bins], [b["max"] for b in bins], color="orange", label="max per bin")
    _burst_marks(ax, res)
    ax.set(xlabel="time since start (s)", ylabel="inter-token gap (ms)", yscale="log",
           title=f"{res['label']}: inter-token gaps of the main streams")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cdfs(res: dict, path: str) -> str:
    plt = _pyplot()
    records = [r for r in records_of(res) if r.ok and r.chunk_times]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in ("main", "burst"):
        _cdf(left, [metrics.ttft_ms(r) for r in records if r.kind == kind], kind)
    _cdf(right, [g for r in records if r.kind == "main" for g in metrics.gaps_ms(r)], "main")
    left.set(xlabel="TTFT (ms)", ylabel="fraction of requests", xscale="log", title="TTFT CDF")
    right.set(xlabel="inter-token gap (ms)", ylabel="fraction of gaps", xscale="log", title="ITL CDF")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(res["label"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(results: list[dict], path: str) -> str:
    """Latency percentiles against achieved output throughput, one point per rate."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["summary"]["throughput"]["output_tokens_per_s"] for r in results]
    for ax, name in ((left, "ttft_ms"), (right, "itl_ms")):
        for q in ("p50", "p99"):
            ax.plot(x, [r["summary"].get("main", {}).get(name, {}).get(q) for r in results], marker="o", label=q)
        ax.set(xlabel="output throughput (tok/s)", ylabel=f"{name.split('_')[0].upper()} (ms)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("latency vs throughput (" + ", ".join(r["label"] for r in results) + ")", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(results: list[dict], path: str) -> str:
    """ITL CDFs of the main streams and their p99 gap over time, one line per run."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for res in results:
        records = [r for r in records_of(res) if r.ok and r.kind == "main"]
        _cdf(left, [g for r in records for g in metrics.gaps_ms(r)], res["label"])
        bins = res["summary"]["gaps_over_time"]
        right.plot([b["t_s"] for b in bins], [b["p99"] for b in bins], label=res["label"])
    for burst in results[0]["config"].get("workload", {}).get("bursts", ()) if results else ():
        right.axvline(burst["at"], color="red", linestyle="--", linewidth=1)
    left.set(xlabel="inter-token gap (ms)", ylabel="fraction of gaps", xscale="log", title="ITL CDF")
    right.set(xlabel="time since start (s)", ylabel="p99 gap per bin (ms)", yscale="log", title="ITL p99 over time")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_plots(res: dict, out_dir: str, stem: str) -> list[str]:
    return [itl_over_time(res, os.path.join(out_dir, f"{stem}_itl_over_time.png")),
            cdfs(res, os.path.join(out_dir, f"{stem}_cdf.png"))]
