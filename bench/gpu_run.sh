#!/usr/bin/env bash
# One GPU run: the GPU tests (kernels, engine with CUDA graphs), then the speed benchmark.
# On the device machine, from the repo root:
#   OUT=<dir> bash bench/gpu_run.sh [gpu_speed.py flags...]
# Env: TESTS (pytest targets; "none" skips them), TEST_TIMEOUT, BENCH_TIMEOUT (seconds).
# Writes $OUT/gpu_tests.log, $OUT/bench.log and $OUT/gpu_speed.json (-> bench/results/gpu_speed.json).
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
source bench/_gpu_env.sh
TESTS=${TESTS:-"tests/kernels tests/engine/test_gpu_engine.py"}
if [ "$TESTS" != "none" ]; then
  # shellcheck disable=SC2086
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -o addopts="" $TESTS \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
timeout "${BENCH_TIMEOUT:-480}" python3 bench/gpu_speed.py --out "$OUT/gpu_speed.json" "$@" 2>&1 \
  | tee "$OUT/bench.log" | tail -70
