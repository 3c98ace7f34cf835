"""Cross-check of loadtest against guidellm (the vLLM project's benchmark tool) on one server.

    python bench/guidellm_crosscheck.py --url http://127.0.0.1:8000 --tokenizer MODEL_DIR \\
        [--guidellm /path/to/venv/bin/guidellm] [--rounds 3] [--out DIR]

Alternates `python -m loadtest` and `guidellm run` (same load: /v1/completions streamed, 4
concurrent streams, 24 requests of 32 prompt tokens and 16 output tokens) `--rounds` times, so a
noisy machine affects both alike, and prints each round's TTFT and ITL medians and the median over
rounds with their ratio (the issue's bar: within 20 %). guidellm is not a project dependency:
install it in its own venv (`python -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install guidellm`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

STREAMS, REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 4, 24, 32, 16


def ours(url: str, out: pathlib.Path, label: str) -> tuple[float, float]:
    subprocess.run([sys.executable, "-m", "loadtest", "--backend", "completions", "--target", url,
                    "--prompt-format", "text", "--input-len", str(PROMPT_TOKENS), "--output-len", str(OUTPUT_TOKENS),
                    "--concurrency", str(STREAMS), "--num-requests", str(REQUESTS), "--warmup", "0", "--no-progress",
                    "--no-plots", "--label", label, "--out", str(out)], check=True, capture_output=True)
    main = json.loads((out / f"{label}.json").read_text())["summary"]["main"]
    return main["ttft_ms"]["p50"], main["itl_ms"]["p50"]


def scenario(url: str, tokenizer: str, path: pathlib.Path) -> dict:
    return {"spec": {
        "backend": {"kind": "openai_http", "target": url, "request_format": "/v1/completions"},
        "profile": {"kind": "concurrent", "streams": STREAMS},
        "tokenizer": {"kind": "huggingface_auto", "model": tokenizer},
        "data": [{"kind": "synthetic_text", "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS}],
        "constraints": [{"kind": "max_requests", "count": REQUESTS}],
        "outputs": [{"kind": "json", "path": str(path)}]}}


def _median(node) -> float:
    """The median of a guidellm distribution summary, wherever this version keeps it."""
    if isinstance(node, dict):
        for key in ("median", "p50"):
            if isinstance(node.get(key), (int, float)):
                return float(node[key])
        for key in ("successful", "total"):
            if key in node:
                return _median(node[key])
    raise KeyError("no median in guidellm's output")


def guidellm(exe: str, url: str, tokenizer: str, out: pathlib.Path, label: str) -> tuple[float, float]:
    result = out / f"{label}.json"
    spec = out / f"{label}_scenario.json"
    spec.write_text(json.dumps(scenario(url, tokenizer, result)))
    subprocess.run([exe, "run", "--scenario", str(spec), "--disable-console-interactive"], check=True,
                   capture_output=True)
    metrics = json.loads(result.read_text())["benchmarks"][0]["metrics"]
    ttft = _median(metrics["time_to_first_token_ms"])
    itl = _median(metrics["inter_token_latency_ms"])
    return ttft, itl


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL of the OpenAI-compatible server")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer (dir or id) guidellm sizes its prompts with")
    p.add_argument("--guidellm", default="guidellm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/guidellm_crosscheck"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(ns.rounds):
        a = ours(ns.url, ns.out, f"loadtest_{i}")
        b = guidellm(ns.guidellm, ns.url, ns.tokenizer, ns.out, f"guidellm_{i}")
        rows.append((a, b))
        print(f"round {i}: loadtest TTFT {a[0]:.1f} ITL {a[1]:.2f} ms | guidellm TTFT {b[0]:.1f} ITL {b[1]:.2f} ms",
              flush=True)
    med = [statistics.median(r[k][j] for r in rows) for k in (0, 1) for j in (0, 1)]
    print(f"median over rounds: loadtest TTFT {med[0]:.1f} ITL {med[1]:.2f} ms; guidellm TTFT {med[2]:.1f} "
          f"ITL {med[3]:.2f} ms; ratio TTFT {med[0] / med[2]:.2f}, ITL {med[1] / med[3]:.2f}")
    (ns.out / "crosscheck.json").write_text(json.dumps({"rounds": rows, "median": med}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
