#!/usr/bin/env bash
# The no-stall benchmark (issue 12): do long prompts stall the token streams already decoding?
# One `python -m loadtest` run compares, on ONE GPU, three `pdserve serve` configurations:
#   colocated  one node that prefills its own prompts (--num-prefill 0)
#   1p1d       1 prefill + 1 decode node time-slicing the GPU
#   1p1d_mps   1 prefill + 1 decode node sharing the GPU's SMs through MPS (--gpu-share mps)
# each under chat load (32 concurrent streams, 128-token prompts, NEW_TOKENS new tokens each), first
# without bursts, then with a burst of 8 prompts of 7,000 tokens 2 s in. Prints the loadtest tables,
# then a short table (bench/nostall_table.py); writes JSON, PNG and the stacks' logs to $OUT.
#
# On the GPU machine, from the repo root (H200: Llama-3-8B shape, bf16 random weights in /dev/shm):
#   OUT=<dir> bash bench/gpu_nostall.sh
# On CPU, the same harness at small scale (tiny llama, 8 streams, bursts of 4 x 384 tokens):
#   OUT=<dir> bash bench/gpu_nostall.sh --tiny
# Env: NEW_TOKENS (default 1024; 256 with --tiny), PREFILL_SM_PERCENT (MPS share of the prefill node,
#      default 50), CONFIGS (default "colocated 1p1d 1p1d_mps"; 1p1d_mpsNN gives prefill NN% of the SMs),
#      BENCH_TIMEOUT (s, 480),
#      PY (python, default python3; .venv/bin/python on CPU if present).
# Needs grpcio >= 1.84.2 with grpcio-reflection / grpcio-health-checking; where they are missing the
# wheels in $WHEELS (default .kwhl/) are installed into /tmp/site (as bench/gpu_run.sh does).
set -uo pipefail
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-/tmp/nostall_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
[ "$TINY" = 1 ] && [ -x .venv/bin/python ] && [ "$PY" = python3 ] && PY=.venv/bin/python
START=$(date +%s)

WHEELS=${WHEELS:-.kwhl}
if ! $PY -c "import grpc_health.v1, grpc_reflection.v1alpha, protos.pdserve.v1.generation_pb2_grpc" 2>/dev/null \
    && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY -c "import torch, grpc; print('torch', torch.__version__, 'grpcio', grpc.__version__, 'cuda', torch.cuda.is_available())"

if [ "$TINY" = 1 ]; then
  NEW_TOKENS=${NEW_TOKENS:-256}
  MODEL=$($PY bench/nostall_model.py --tiny 2>"$OUT/model.log" | tail -1)
  ENGINE="--dtype float32 --device cpu --max-model-len 1024 --num-gpu-blocks 1024 --max-num-seqs 32"
  LOAD="--concurrency 8 --num-requests 8 --input-len 32 --burst at=1,count=4,len=384,out=8 --low-id 260"
  SLO="--slo ttft_ms=1000 --slo itl_ms=50"
else
  NEW_TOKENS=${NEW_TOKENS:-1024}
  MODEL=$($PY bench/nostall_model.py 2>"$OUT/model.log" | tail -1)
  # 8192 blocks of 16 tokens = 16 GiB of KV per node (32 x 1152 + 8 x 7016 tokens need ~5.9k blocks)
  ENGINE="--dtype bfloat16 --max-model-len 8192 --num-gpu-blocks 8192 --max-num-seqs 64"
  LOAD="--concurrency 32 --num-requests 32 --input-len 128 --burst at=2,count=8,len=7000,out=16"
  SLO="--slo ttft_ms=1000 --slo itl_ms=50"
fi
if [ -z "$MODEL" ] || [ ! -d "$MODEL" ]; then
  echo "could not build the model:"; tail -20 "$OUT/model.log"; exit 1
fi
echo "model $MODEL ($(( $(date +%s) - START )) s)"
trap 'rm -rf "$MODEL"' EXIT

COMMON="--model $MODEL $ENGINE --no-gateway --grace-period 5"
SERVE=()
for name in ${CONFIGS:-colocated 1p1d 1p1d_mps}; do  # 1p1d_mpsNN: MPS with NN% of the SMs for prefill
  case "$name" in
    colocated) args="$COMMON --num-prefill 0 --num-decode 1" ;;
    1p1d) args="$COMMON --num-prefill 1 --num-decode 1" ;;
    1p1d_mps*)
      if ! command -v nvidia-cuda-mps-control >/dev/null; then
        echo "skipping $name: nvidia-cuda-mps-control is not on this machine"; continue
      fi
      pct=${name#1p1d_mps}
      args="$COMMON --num-prefill 1 --num-decode 1 --gpu-share mps --prefill-sm-percent ${pct:-${PREFILL_SM_PERCENT:-50}}" ;;
    *) echo "unknown configuration $name (colocated, 1p1d, 1p1d_mps, 1p1d_mpsNN)"; exit 2 ;;
  esac
  SERVE+=(--serve "$args" --label "$name")
done

# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-480}" $PY -m loadtest "${SERVE[@]}" $LOAD --output-len "$NEW_TOKENS" $SLO \
  --with-and-without-bursts --warmup 4 --max-duration 120 --drain 60 --startup-timeout 240 --no-progress \
  --out "$OUT" 2>&1 | tee "$OUT/loadtest.log" | grep -v "^\[" | tail -120
echo "loadtest exit code ${PIPESTATUS[0]}; $(( $(date +%s) - START )) s in all"
echo
$PY bench/nostall_table.py "$OUT"
