"""Results as a table on the terminal and as JSON (config, versions, host, summary, per-request
records); `compare()` puts several results side by side."""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys

from loadtest.clients import Record

PACKAGES = ("pdserve", "grpcio", "httpx", "torch", "transformers", "numpy", "matplotlib")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def host() -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        try:
            reply = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            info["gpus"] = [line for line in reply.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def result(label: str, config: dict, server: dict, summary: dict, records: list[Record]) -> dict:
    return {"label": label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "config": config, "server": server, "versions": versions(),
            "host": host(), "summary": summary, "records": [_record(r) for r in records]}


def _record(r: Record) -> dict:
    d = dataclasses.asdict(r)
    d["chunk_times"] = [round(t, 6) for t in r.chunk_times]
    return d


def records_of(res: dict) -> list[Record]:
    return [Record(**d) for d in res["records"]]


def write_json(path: str, res: dict) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def load_json(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    if "summary" not in res or "records" not in res:
        raise ValueError(f"{path} is not a loadtest result (no summary / records)")
    return res


# -- text ------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _rows(summary: dict) -> list[tuple[str, dict]]:
    rows = []
    for kind in ("main", "burst"):
        for name, s in summary.get(kind, {}).items():
            if isinstance(s, dict) and s.get("count"):
                rows.append((f"{kind} {name}", s))
    if summary.get("main_itl_ms_during_bursts", {}).get("count"):
        rows.append(("main itl_ms during bursts", summary["main_itl_ms_during_bursts"]))
    return rows


def table(label: str, summary: dict) -> str:
    req, tput, good = summary["requests"], summary["throughput"], summary["goodput"]
    errors = {k: v for k, v in req["by_status"].items() if k != "ok"}
    slo = ", ".join(f"{k} {v:g}" for k, v in good["slo"].items()) or "none"
    lines = [f"== {label}",
             f"requests {req['ok']} ok of {req['sent']} sent ({req['total']} planned); errors {errors or 'none'}",
             f"duration {summary['duration_s']:.2f} s; {tput['requests_per_s']:.3g} req/s; input "
             f"{tput['input_tokens_per_s']:.4g} tok/s; output {tput['output_tokens_per_s']:.4g} tok/s",
             f"goodput (SLO {slo}): {good['requests']} requests = {good['fraction']:.1%}, "
             f"{good['requests_per_s']:.3g} req/s"]
    head = f"{'metric':32s}" + "".join(f"{c:>11s}" for c in ("count", "p50", "p90", "p95", "p99", "max"))
    lines.append(head)
    for name, s in _rows(summary):
        lines.append(f"{name:32s}" + "".join(f"{_fmt(s.get(c)):>11s}" for c in ("count", "p50", "p90", "p95", "p99",
                                                                                 "max")))
    return "\n".join(lines)


COMPARE_ROWS = (
    ("chat ITL p50 ms", ("main", "itl_ms", "p50")),
    ("chat ITL p99 ms", ("main", "itl_ms", "p99")),
    ("chat ITL max ms", ("main", "itl_ms", "max")),
    ("chat ITL p99 after 1st ms", ("main", "itl_after_first_ms", "p99")),
    ("chat ITL max after 1st ms", ("main", "itl_after_first_ms", "max")),
    ("chat 1st-to-2nd gap p50 ms", ("main", "first_gap_ms", "p50")),
    ("chat ITL p99 in bursts ms", ("main_itl_ms_during_bursts", "p99")),
    ("chat ITL max in bursts ms", ("main_itl_ms_during_bursts", "max")),
    ("chat TTFT p50 ms", ("main", "ttft_ms", "p50")),
    ("chat TTFT p99 ms", ("main", "ttft_ms", "p99")),
    ("chat TPOT p50 ms", ("main", "tpot_ms", "p50")),
    ("burst TTFT p50 ms", ("burst", "ttft_ms", "p50")),
    ("burst TTFT max ms", ("burst", "ttft_ms", "max")),
    ("goodput %", ("goodput", "fraction")),
    ("output tok/s", ("throughput", "output_tokens_per_s")),
    ("ok / sent", ("requests",)),
)


def _lookup(summary: dict, path: tuple) -> str:
    if path == ("requests",):
        return f"{summary['requests']['ok']}/{summary['requests']['sent']}"
    value = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    if path == ("goodput", "fraction") and value is not None:
        return f"{100 * value:.1f}"
    return _fmt(value)


def compare(results: list[dict]) -> str:
    labels = [r["label"] for r in results]
    width = max(14, *(len(label) + 2 for label in labels))
    lines = [f"{'':28s}" + "".join(f"{label:>{width}s}" for label in labels)]
    for name, path in COMPARE_ROWS:
        cells = [_lookup(r["summary"], path) for r in results]
        if any(c != "-" for c in cells):
            lines.append(f"{name:28s}" + "".join(f"{c:>{width}s}" for c in cells))
    return "\n".join(lines)
