#!/usr/bin/env bash
# The SDXL VAE decode at 1024² (bf16) with each shape's cuDNN algorithm chosen by our default rule
# (the heuristic's ranking, tensor-core entries first for half precision) and by timing them all
# (SDGEN_CUDNN_FIND=1): time per decode, GPU peak, and each shape's choice (SDGEN_CUDNN_LOG=1).
# Expects /tmp/sdgen-bench and the model folder /tmp/sdxl (tools/gpu/speed.sh makes both).
set -uo pipefail
OUT=${OUT:-/tmp/out}; D="$OUT/vae_algos"; mkdir -p "$D"
source "$(dirname "$0")/cuda_env.sh"
for mode in heuristic find; do
  find=""; [ $mode = find ] && find=1
  SDGEN_CUDNN_LOG=1 SDGEN_CUDNN_FIND=$find /tmp/sdgen-bench --family sdxl --model-dir /tmp/sdxl --device cuda \
    --dtype bf16 --width 1024 --height 1024 --component vae --iterations 7 > "$D/$mode.json" 2> "$D/$mode.log"
  python3 - "$D/$mode.json" $mode <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["result"]
except Exception as e:
    print(f"  {sys.argv[2]}: no result ({e})"); sys.exit()
ev = r["timed"]["eval"]; peak = (r["timed"]["memory"].get("peak_gpu_bytes") or 0) / 1e9
print(f"  vae decode 1024², algorithms by {sys.argv[2]}: median {ev['median_ms']:.1f} ms (min {ev['min_ms']:.1f}), GPU peak {peak:.2f} GB")
PY
  grep -h "^cudnn " "$D/$mode.log" | sed 's/^/    /'
done
