#!/usr/bin/env bash
# The CPU speed issue's table (#12), ours beside diffusers on torch on the same cores: SD 1.5 at
# 512², one UNet evaluation of the CFG batch and one VAE decode, f32 and bf16, then the kernel
# seam's linears, convolutions and attention alone at the same shapes (`sdgen-bench --component
# ops` vs `peer_ops.py`). Run from the repository root on a quiet machine (every figure is printed
# with the load average it was taken under). Needs torch + diffusers for $PY.
#   THREADS=2 PY=/tmp/torchenv/bin/python bash tools/cpu/bench_cpu.sh
# Writes $OUT/*.json and prints a markdown table; model folders go to /tmp/sd15-{f32,bf16}
# (random weights written by sdgen-bench, ~4 GB f32 / 2 GB bf16, reused when present).
set -euo pipefail
THREADS=${THREADS:-$(nproc)}
PY=${PY:-python3}
OUT=${OUT:-bench-cpu}
ITERATIONS=${ITERATIONS:-3}
mkdir -p "$OUT"
export RAYON_NUM_THREADS=$THREADS
cargo build --release -q -p sdgen-bench
BENCH=target/release/sdgen-bench
load() { cut -d' ' -f1-3 /proc/loadavg; }
for dt in f32 bf16; do
  "$BENCH" --family sd15 --model-dir "/tmp/sd15-$dt" --dtype "$dt" --write-only > /dev/null
done
for dt in f32 bf16; do
  echo "ops $dt (load $(load))" >&2
  "$BENCH" --component ops --dtype "$dt" --warmup 1 --iterations "$ITERATIONS" > "$OUT/ops_$dt.json"
  echo "$(load)" > "$OUT/ops_${dt}.load"
done
echo "peer ops (load $(load))" >&2
"$PY" tools/cpu/peer_ops.py "$THREADS" "$ITERATIONS" > "$OUT/peer_ops.json"
echo "$(load)" > "$OUT/peer_ops.load"
for dt in f32 bf16; do
  for component in unet vae; do
    echo "$component $dt (load $(load))" >&2
    "$BENCH" --family sd15 --model-dir "/tmp/sd15-$dt" --dtype "$dt" --component "$component" \
      --warmup 1 --iterations "$ITERATIONS" > "$OUT/${component}_$dt.json"
    echo "$(load)" > "$OUT/${component}_${dt}.load"
  done
done
echo "peer components (load $(load))" >&2
"$PY" tools/cpu/peer_cpu.py /tmp/sd15-f32 "$THREADS" > "$OUT/peer_cpu.json"
echo "$(load)" > "$OUT/peer_cpu.load"
"$PY" tools/cpu/bench_table.py "$OUT"
