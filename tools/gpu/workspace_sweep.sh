#!/usr/bin/env bash
# The cuDNN workspace cap against speed and GPU peak: the SDXL VAE decode at 1024² (bf16) with the
# default per-shape cap and with fixed caps (SDGEN_CUDNN_WORKSPACE_MB), each shape's algorithm
# logged (SDGEN_CUDNN_LOG=1). Run after tools/gpu/speed.sh has unpacked /tmp/sdgen-bench and written
# /tmp/sdxl (PARTS=bench does both). CAPS narrows the fixed caps (default "1024 512 256 128 64 0").
set -uo pipefail
OUT=${OUT:-/tmp/out}; D="$OUT/speed/workspace"; mkdir -p "$D"
source "$(dirname "$0")/cuda_env.sh"
export SDGEN_FAST_KERNELS=1
for cap in default ${CAPS:-1024 512 256 128 64 0}; do
  env=(SDGEN_CUDNN_LOG=1); [ "$cap" != default ] && env+=(SDGEN_CUDNN_WORKSPACE_MB=$cap)
  env "${env[@]}" /tmp/sdgen-bench --family sdxl --model-dir /tmp/sdxl --device cuda --dtype bf16 --width 1024 \
    --height 1024 --component vae --iterations 5 > "$D/vae_$cap.json" 2> "$D/vae_$cap.log"
  python3 - "$D/vae_$cap.json" "$cap" "$D/vae_$cap.log" <<'PY'
import json, re, sys
try:
    r = json.load(open(sys.argv[1]))["result"]
except Exception as e:
    print(f"  cap {sys.argv[2]}: no result ({e})"); sys.exit()
ev = r["timed"]["eval"]; peak = (r["timed"]["memory"].get("peak_gpu_bytes") or 0) / 1e9
ws = [int(m) for m in re.findall(r"workspace (\d+) MiB", open(sys.argv[3]).read())]
print(f"  vae decode 1024² cap {sys.argv[2]:>7} MiB: median {ev['median_ms']:.1f} ms (min {ev['min_ms']:.1f}), "
      f"GPU peak {peak:.2f} GB, largest workspace {max(ws, default=0)} MiB")
PY
done
