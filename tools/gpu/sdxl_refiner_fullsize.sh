#!/usr/bin/env bash
# SDXL base → refiner at full size (random weights) through `generate --refiner`: both folders
# written by sdgen-bench (--write-only), then one 1024², 30-step bf16 run; prints the seed's memory
# lines around the handoff and the sidecar's refiner record. Expects .carry/{generate,sdgen-bench}.xz;
# writes $OUT/refiner.tgz (log, sidecar; no image).
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/refiner"
unpack generate sdgen-bench
BASE=${BASE:-/tmp/bench-sdxl-bf16}; REF=/tmp/bench-sdxl-refiner-bf16
for f in "sdxl $BASE" "sdxl-refiner $REF"; do
  set -- $f; S=$SECONDS
  /tmp/sdgen-bench --family $1 --model-dir $2 --device cuda --dtype bf16 --write-only > /dev/null 2> "$OUT/refiner/write-$1.log"
  echo "write $1 exit $? ($((SECONDS - S)) s)"
done
S=$SECONDS
/tmp/generate "a lighthouse at dusk" --model $BASE --refiner $REF --seed 42 --steps 30 --device cuda --dtype bf16 \
  --output "$OUT/refiner/img" --json > "$OUT/refiner/result.json" 2> "$OUT/refiner/generate.log"
echo "generate --refiner exit $? ($((SECONDS - S)) s)"
grep -E "Memory \[|Verdict|plan:|error" "$OUT/refiner/generate.log" | head -40
python3 - "$OUT/refiner" <<'PY'
import glob, json, sys
d = sys.argv[1]
side = glob.glob(d + "/img/*.json")
if side:
    m = json.load(open(side[0]))
    print("refiner:", m["extra"].get("refiner"))
    print("timings:", m["timings_ms"])
    print("stage peaks (GB):", [(s["label"], round((s.get("peak_gpu_bytes") or 0) / 1e9, 2)) for s in m["extra"]["memory"]])
PY
rm -f "$OUT"/refiner/img/*.png
(cd "$OUT" && tar czf refiner.tgz refiner && rm -rf refiner)
