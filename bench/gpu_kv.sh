#!/usr/bin/env bash
# One GPU run of the KV path (issue 11): ipc == grpc == in-process greedy output (tiny fp32 and
# Llama-3-8B shape bf16), then single-transfer timings of 1k / 4k / 7k-token KV per transport.
# On the device machine, from the repo root (wheels in .whl/kv: grpcio 1.84.2 cp312,
# grpcio-reflection / grpcio-health-checking 1.84.0, protobuf):
#   OUT=<dir> bash bench/gpu_kv.sh [kv_transfer_bench.py flags...]
# Writes $OUT/kv_transfer.json, $OUT/kv_bench.log and the nodes' logs (-> bench/results/kv_transfer.json).
set -o pipefail
OUT=${OUT:-/tmp/kv_out}
mkdir -p "$OUT"
source bench/_gpu_env.sh
nvidia-smi -L
python3 -c "import torch, grpc, google.protobuf as pb; print('torch', torch.__version__, 'grpc', grpc.__version__, 'protobuf', pb.__version__, torch.cuda.get_device_name())"
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/services/test_kv_ipc.py -k "not cpu_decode_node" 2>&1 \
  | tee "$OUT/kv_ipc_tests.log" | tail -15
timeout "${BENCH_TIMEOUT:-500}" python3 bench/kv_transfer_bench.py --out "$OUT/kv_transfer.json" "$@" 2>&1 \
  | tee "$OUT/kv_bench.log" | tail -60
rc=$?
for f in "$OUT"/*_gpu_speed_*.log; do [ -f "$f" ] && tail -c 20000 "$f" > "$f.tail" && mv "$f.tail" "$f"; done
exit $rc
