#!/usr/bin/env bash
# Issue 16 on one GPU: the quantization GPU tests, then bench/gpu_quant.py (Llama-3-8B shape:
# AWQ int4 batch-1 decode and FP8 offline throughput vs bf16, logits cosine). ~5 minutes on an H200.
# On the device machine, from the repo root:
#   OUT=<dir> bash bench/gpu_quant.sh [gpu_quant.py flags, e.g. --num-prompts 1000]
# Env: TESTS (pytest targets; "none" skips them), TEST_TIMEOUT, BENCH_TIMEOUT (seconds).
# Writes $OUT/gpu_quant_tests.log, $OUT/gpu_quant.log and $OUT/gpu_quant.json.
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
source bench/_gpu_env.sh
TESTS=${TESTS:-"tests/kernels/test_w4a16_gemm.py tests/engine/test_quant_formats.py tests/engine/test_quant_gpu.py"}
if [ "$TESTS" != "none" ]; then
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -o addopts="" $TESTS \
    2>&1 | tee "$OUT/gpu_quant_tests.log" | tail -30
fi
timeout "${BENCH_TIMEOUT:-420}" python3 bench/gpu_quant.py --out "$OUT/gpu_quant.json" "$@" 2>&1 \
  | tee "$OUT/gpu_quant.log" | tail -30
