#!/usr/bin/env bash
# One GPU run for the FP8 KV cache (issue 16 item 3): the fp8 kernel and engine tests on CUDA (and
# the GPU prompt-logprobs test), the decode-kernel tile sweep (bf16 vs fp8 cache), then
# bench/gpu_speed.py's batch-1 decode, decode steps at batch 1 / 64 / 256 (1k context) and the KV
# blocks the memory budget fits, with --kv-cache-dtype auto and fp8.
# On the device machine, from the repo root (wheels: bench/_gpu_env.sh):
#   OUT=<dir> bash bench/gpu_kv_fp8.sh            (SKIP_SWEEP=1 to leave the sweep out)
# Writes $OUT/fp8_tests.log, $OUT/decode_sweep.{json,log}, $OUT/speed_{auto,fp8}.json and .log.
set -o pipefail
OUT=${OUT:-/tmp/kv_fp8_out}
mkdir -p "$OUT"
source bench/_gpu_env.sh
nvidia-smi -L
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" -s tests/kernels/test_fp8_kv.py \
  "tests/engine/test_fp8_kv.py::test_fp8_gpu_triton_and_cuda_graphs" tests/engine/test_prompt_logprobs_gpu.py 2>&1 \
  | grep -v "^Writing model" | tee "$OUT/fp8_tests.log" | tail -20
[ -n "$SKIP_SWEEP" ] || timeout 300 python3 bench/decode_kernel_sweep.py --out "$OUT/decode_sweep.json" 2>&1 \
  | tee "$OUT/decode_sweep.log" | tail -16
[ -n "$SKIP_SPEED" ] || for kv in auto fp8; do
  timeout 240 python3 bench/gpu_speed.py --sections p1,floor --kv-cache-dtype "$kv" --budget-s 220 \
    --out "$OUT/speed_$kv.json" 2>&1 | tee "$OUT/speed_$kv.log" | grep -E "engine:|decode|tok/s" | tail -8
done
