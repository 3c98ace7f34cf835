#!/usr/bin/env bash
# One GPU call for the gRPC lanes question (issue 11): does a transfer over 2 or 4 PushKV lanes
# (connections) beat one on a GPU host, and does the ISA-L CRC help? On the device machine, from
# the repo root, wheels in .whl/kv (carry [".whl"]), fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl/kv grpcio==1.84.2 grpcio-reflection==1.84.0 grpcio-health-checking==1.84.0 isal crc32c
#   OUT=<dir> bash bench/gpu_kv_lanes.sh
# 1. bench/grpc_wire_probe.py: grpcio alone over 1/2/4 connections, our per-frame work, CRC libraries
# 2. bench/kv_transfer_bench.py on the Llama-3-8B shape: equality (ipc, grpc), the node path with
#    prefill nodes of 1, 2 and 4 lanes on one decode node, transport only at 1/2/4 lanes, grpcio ceiling
# Writes $OUT/probe.json, $OUT/kv_lanes.json and the logs (-> bench/results/kv_lanes_h200.json).
set -o pipefail
OUT=${OUT:-/tmp/kv_lanes_out}
mkdir -p "$OUT"
source bench/_gpu_env.sh
nvidia-smi -L
nproc
python3 -c "import torch, grpc; print('torch', torch.__version__, 'grpc', grpc.__version__, torch.cuda.get_device_name())"
python3 -c "import isal; print('isal', isal.__version__)" || echo "isal missing: CRC falls back to zlib"
timeout 200 python3 bench/grpc_wire_probe.py --out "$OUT/probe.json" 2>&1 | tee "$OUT/probe.log" | tail -20
timeout "${BENCH_TIMEOUT:-360}" python3 bench/kv_transfer_bench.py --out "$OUT/kv_lanes.json" --sizes 4096,7168 \
  --frames-mib 8 --lanes 1,2,4 --node-lanes 1,2,4 --sections node,raw,ceiling --repeats 3 "$@" 2>&1 \
  | tee "$OUT/kv_bench.log" | tail -40
