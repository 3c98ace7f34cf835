#!/usr/bin/env bash
# One GPU run for the attention kernels: the kernel tests on CUDA, then the benchmark.
# On the device machine, from the repo root:  OUT=<dir> bash bench/gpu_kernels.sh [--sweep]
# Writes $OUT/gpu_tests.log, $OUT/bench.log and $OUT/kernels.json (-> bench/results/kernels.json).
set -o pipefail
OUT=${OUT:-/tmp/kernels_out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
source bench/_gpu_env.sh
timeout 270 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -40
timeout 240 python3 bench/kernels_bench.py --out "$OUT/kernels.json" "$@" 2>&1 | tee "$OUT/bench.log"
