#!/usr/bin/env bash
# SD 1.5 at full size (random weights) through sdgen-bench on the GPU: per-stage time and
# measured peaks beside the planner's estimates (512² and 768², batches 1 and 4), and a leak
# check (10 generations in one process). Expects .carry/sdgen-bench.xz; writes $OUT.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
unpack sdgen-bench
M=/tmp/bench-sd15-bf16
for cfg in "512 1" "512 4" "768 1" "768 4"; do
  set -- $cfg
  /tmp/sdgen-bench --model-dir $M --device cuda --dtype bf16 --width "$1" --height "$1" --n "$2" --steps 10 \
    > "$OUT/bench_${1}_b$2.json" 2> "$OUT/bench_${1}_b$2.log"
  echo "bench ${1}² n=$2 exit $?"; tail -c 300 "$OUT/bench_${1}_b$2.log"
done
/tmp/sdgen-bench --model-dir $M --device cuda --dtype bf16 --width 512 --height 512 --n 1 --steps 4 --runs 10 \
  > "$OUT/bench_leak.json" 2> "$OUT/bench_leak.log"; echo "leak run exit $?"
python3 tools/gpu/summarize_bench.py "$OUT" | tee "$OUT/bench_summary.txt"
