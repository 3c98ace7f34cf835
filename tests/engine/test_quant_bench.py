"""bench/gpu_quant.py --tiny runs the GPU benchmark's whole code path on CPU (slow: ~1-3 min)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_quant_bench_tiny_runs_and_reports(tmp_path):
    out = tmp_path / "gpu_quant.json"
    subprocess.run([sys.executable, "bench/gpu_quant.py", "--tiny", "--out", str(out)], check=True, timeout=600,
                   capture_output=True)
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) >= {"bf16", "awq", "fp8", "logits_cosine", "awq_decode_speedup", "fp8_offline_speedup"}
    assert metrics["logits_cosine"]["fp8"]["mean"] > 0.99 and metrics["logits_cosine"]["awq"]["mean"] > 0.95
    assert all(metrics[m]["decode_bs1_tok_s"] > 0 for m in ("bf16", "awq", "fp8"))
