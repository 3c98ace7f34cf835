"""The no-stall benchmark's short table, from the loadtest JSON files of one run.

    python bench/nostall_table.py OUT_DIR [--json OUT_DIR/nostall_summary.json]

For each configuration (label/noburst and label/burst files): the chat streams' ITL p50/p99/max
without and with bursts, their p99 and max during the bursts, the long prompts' TTFT, goodput, and
the goal of issue 12 (during bursts ITL p99 within 1.25x and the worst gap within 3x of the
no-burst figures, both below the colocated node's).
"""
from __future__ import annotations

import argparse
import json
import pathlib

P99_GOAL, MAX_GOAL = 1.25, 3.0


def _get(summary: dict, *path):
    for key in path:
        summary = summary.get(key) if isinstance(summary, dict) else None
    return summary


def load(out: pathlib.Path) -> dict[str, dict]:
    """label -> {"noburst": summary, "burst": summary} (either may be missing)."""
    runs: dict[str, dict] = {}
    for path in sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime):  # in the order they ran
        res = json.loads(path.read_text())
        if "summary" not in res or "/" not in res.get("label", ""):
            continue
        label, variant = res["label"].rsplit("/", 1)
        runs.setdefault(label, {})[variant] = res["summary"]
    return runs


def row(label: str, runs: dict) -> dict:
    """Quiet figures are the chat streams' gaps after their first (steady decoding; the first-to-second
    gap, the KV hand-off, is shown apart); burst figures are the gaps that ended while burst requests
    were in flight."""
    quiet, burst = runs.get("noburst", {}), runs.get("burst", {})
    r = {"config": label}
    for q in ("p50", "p99", "max"):
        r[f"quiet_itl_{q}"] = _get(quiet, "main", "itl_after_first_ms", q)
        r[f"burst_itl_{q}"] = _get(burst, "main_itl_ms_during_bursts", q)
    r["first_gap_p50"] = _get(quiet, "main", "first_gap_ms", "p50")
    r["long_ttft_p50"] = _get(burst, "burst", "ttft_ms", "p50")
    r["long_ttft_max"] = _get(burst, "burst", "ttft_ms", "max")
    r["quiet_goodput"] = _get(quiet, "goodput", "fraction")
    r["burst_goodput"] = _get(burst, "goodput", "fraction")
    r["ok"] = ", ".join(f"{_get(s, 'requests', 'ok')}/{_get(s, 'requests', 'sent')}" for s in (quiet, burst) if s)
    if r["quiet_itl_p99"] and r["burst_itl_p99"]:
        r["p99_ratio"] = r["burst_itl_p99"] / r["quiet_itl_p99"]
        r["max_ratio"] = r["burst_itl_max"] / r["quiet_itl_max"]
    return r


def verdicts(rows: list[dict]) -> None:
    colocated = next((r for r in rows if r["config"].startswith("colocated")), None)
    for r in rows:
        if "p99_ratio" not in r:
            r["goal"] = "no data"
            continue
        misses = []
        if r["p99_ratio"] > P99_GOAL:
            misses.append(f"p99 {r['p99_ratio']:.2f}x > {P99_GOAL}x")
        if r["max_ratio"] > MAX_GOAL:
            misses.append(f"max {r['max_ratio']:.2f}x > {MAX_GOAL}x")
        if colocated is not None and r is not colocated and colocated.get("burst_itl_p99"):
            if r["burst_itl_p99"] >= colocated["burst_itl_p99"]:
                misses.append("p99 not below colocated")
            if r["burst_itl_max"] >= colocated["burst_itl_max"]:
                misses.append("max not below colocated")
        r["goal"] = (f"met ({r['p99_ratio']:.2f}x, {r['max_ratio']:.2f}x)" if not misses
                     else "missed: " + "; ".join(misses))


COLUMNS = (("config", "config", 12), ("quiet_itl_p50", "ITL p50", 8), ("quiet_itl_p99", "p99", 7),
           ("quiet_itl_max", "max", 7), ("first_gap_p50", "1st gap", 8), ("burst_itl_p50", "burst p50", 10),
           ("burst_itl_p99", "p99", 7), ("burst_itl_max", "max", 7), ("long_ttft_p50", "long TTFT p50", 14),
           ("long_ttft_max", "max", 7), ("quiet_goodput", "goodput", 8), ("burst_goodput", "+burst", 7),
           ("ok", "ok", 12), ("goal", "goal", 0))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 1 else f"{value:.1f}"
    return str(value)


def table(rows: list[dict]) -> str:
    lines = ["chat streams' gaps (ms): quiet = no bursts, after the first gap; burst = while the long prompts were "
             "in flight; long prompts' TTFT (ms); goodput fraction",
             "".join(f"{title:>{w}s} " if w else title for _, title, w in COLUMNS)]
    for r in rows:
        lines.append("".join(f"{_cell(r.get(k)):>{w}s} " if w else _cell(r.get(k)) for k, _, w in COLUMNS))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--json", type=pathlib.Path)
    ns = p.parse_args(argv)
    rows = [row(label, runs) for label, runs in load(ns.out).items()]
    verdicts(rows)
    print(table(rows))
    (ns.json or ns.out / "nostall_summary.json").write_text(json.dumps(rows, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
