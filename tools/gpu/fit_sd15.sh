#!/usr/bin/env bash
# Measurements for the planner's GPU coefficients: SD 1.5 at full size (random weights) through
# sdgen-bench, bf16 and f32, 512² and 768², batches 1 and 4, plus runs with the UNet's attention
# sliced and the VAE sliced/tiled so the formula's terms can be told apart. Writes $OUT/fit/*.json
# and $OUT/fit/peaks.jsonl (tools/gpu/peaks_to_jsonl.py). Expects .carry/sdgen-bench.xz. DTYPES
# (default "bf16 f32") narrows the precisions measured.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/fit"
unpack sdgen-bench
STEPS=${STEPS:-3}
run() { # dtype size n name [extra args...]
  local dt=$1 px=$2 n=$3 name=$4; shift 4
  /tmp/sdgen-bench --model-dir /tmp/bench-sd15-$dt --device cuda --dtype "$dt" --width "$px" --height "$px" \
    --n "$n" --steps "$STEPS" "$@" > "$OUT/fit/$name.json" 2> "$OUT/fit/$name.log"
  echo "$name exit $? $(tail -c 200 "$OUT/fit/$name.log" | tr '\n' ' ')"
}
for dt in ${DTYPES:-bf16 f32}; do
  for px in 512 768; do for n in 1 4; do run $dt $px $n ${dt}_${px}_n$n; done; done
  # Attention sliced to a quarter and a sixteenth of the rows, and the VAE sliced / tiled.
  run $dt 512 1 ${dt}_512_n1_rows1024 --attention-slice 1024
  run $dt 512 4 ${dt}_512_n4_rows256 --attention-slice 256
  run $dt 768 1 ${dt}_768_n1_rows2304 --attention-slice 2304
  run $dt 768 4 ${dt}_768_n4_vaeslice --vae-slicing
  run $dt 768 1 ${dt}_768_n1_tile512 --vae-tile 512
done
# The same runs again, each a new process: the peaks must repeat (the memory pool's reuse of
# freed blocks is not under our control; the engine keeps its transient buffers small for this).
for dt in ${DTYPES:-bf16 f32}; do run $dt 768 1 ${dt}_768_n1_again; run $dt 512 4 ${dt}_512_n4_again; done
python3 tools/gpu/peaks_to_jsonl.py "$OUT/fit" > "$OUT/fit/peaks.jsonl"
cat "$OUT/fit/peaks.jsonl"
tar czf "$OUT/fit.tgz" -C "$OUT" fit && rm -rf "$OUT/fit"  # one file comes back, not dozens
