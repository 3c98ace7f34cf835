#!/usr/bin/env bash
# One GPU run for the FP8 KV cache (issue 16 item 3): the fp8 kernel and engine tests on CUDA, the
# decode-kernel microbench (bf16 vs fp8 cache), then bench/gpu_speed.py's batch-1 decode and
# decode steps at batch 1 / 64 / 256 (1k context), KV blocks, with --kv-cache-dtype auto and fp8.
# On the device machine, from the repo root (pytest from .kwhl as in bench/gpu_kernels.sh):
#   OUT=<dir> bash bench/gpu_kv_fp8.sh
# Writes $OUT/fp8_tests.log, $OUT/decode_kernel.log, $OUT/speed_{auto,fp8}.json and .log.
set -o pipefail
OUT=${OUT:-/tmp/kv_fp8_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L
if ! python3 -c "import pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .kwhl/*.whl
  export PYTHONPATH=/tmp/site
fi
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels/test_fp8_kv.py \
  "tests/engine/test_fp8_kv.py::test_fp8_gpu_triton_and_cuda_graphs" 2>&1 | tee "$OUT/fp8_tests.log" | tail -20
timeout 120 python3 -m kernels.paged_decode_attention 2>&1 | tee "$OUT/decode_kernel.log"
for kv in auto fp8; do
  timeout 240 python3 bench/gpu_speed.py --sections p1,floor --kv-cache-dtype "$kv" --budget-s 220 \
    --out "$OUT/speed_$kv.json" 2>&1 | tee "$OUT/speed_$kv.log" | tail -14
done
