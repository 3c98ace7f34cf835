#!/usr/bin/env bash
# One GPU call for issue 18's results file, bench/results/gpu_speed_h200.json: batch-1 decode,
# the decode steps against the floor with a per-kernel profile of each step size, the offline
# workload (1000 x 1024 in / 128 out), then the cold start (8 x 7000-token prompts, first round in
# a fresh process with an empty Triton cache vs warm), merged into the same file. The device
# tests of the torch.distributed checksum (sum64) run first. On the device machine, repo root:
#   OUT=<dir> bash bench/gpu_speed_h200.sh
# Env: SPEED_TIMEOUT, COLD_TIMEOUT (seconds). Writes $OUT/gpu_speed_h200.json, the logs.
set -o pipefail
OUT=${OUT:-/tmp/gpu_speed_out}
mkdir -p "$OUT"
source bench/_gpu_env.sh
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/services/test_kv_wire.py -k "sum64 or torch_dist" \
  2>&1 | tail -4
timeout "${SPEED_TIMEOUT:-330}" python3 bench/gpu_speed.py --sections p1,floor,p2 --profile --bandwidth-tbs 4.18 \
  --budget-s 300 --keep-models --out "$OUT/gpu_speed_h200.json" 2>&1 | tee "$OUT/speed.log" | tail -45
model=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['details']['model']['dir'])" "$OUT/gpu_speed_h200.json" 2>/dev/null)
[ -d "$model" ] && dir_arg=(--model-dir "$model") || dir_arg=()
timeout "${COLD_TIMEOUT:-220}" python3 bench/cold_start.py --modes off,auto "${dir_arg[@]}" --timeout 200 \
  --out "$OUT/cold_start.json" --merge-into "$OUT/gpu_speed_h200.json" 2>&1 | tee "$OUT/cold.log" | tail -25
[ -d "$model" ] && rm -rf "$model"
true
