#!/usr/bin/env bash
# One GPU run for streamed KV over gRPC (issue 11): the 8B-shape node path with one chunk (the KV
# moves after the prefill) and with a 2,048-token budget (a 4k / 7k prompt prefills in chunks and
# each chunk's KV leaves while the next is computed), side by side; the equality section checks
# node output == in-process output for a three-chunk prompt. On the device machine, repo root:
#   OUT=<dir> bash bench/gpu_kv_stream.sh        (wheels in .whl/kv as in bench/gpu_kv.sh)
# Writes $OUT/kv_{one,chunked}.json and .log, and the nodes' errors in $OUT/node_errors.log.
set -o pipefail
OUT=${OUT:-/tmp/kv_stream_out}
mkdir -p "$OUT"
source bench/_gpu_env.sh
nvidia-smi -L
for mode in one chunked; do
  extra=(); [ "$mode" = chunked ] && extra=(--chunk-tokens 2048)
  timeout "${BENCH_TIMEOUT:-230}" python3 bench/kv_transfer_bench.py --sections node --repeats 2 \
    --out "$OUT/kv_$mode.json" "${extra[@]}" 2>&1 | tee "$OUT/kv_$mode.log" | tail -14
done
for f in "$OUT"/*_gpu_speed_*.log; do  # the nodes' logs: their errors in one file
  [ -f "$f" ] && { echo "== $(basename "$f")"; grep -v '^\s*$' "$f" | grep -B2 -A30 -m3 -E 'Traceback|ERROR'; } >> "$OUT/node_errors.log"
  rm -f "$f"
done
exit 0
