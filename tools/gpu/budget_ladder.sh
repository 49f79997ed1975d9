#!/usr/bin/env bash
# --max-memory ladder on the GPU: SD 1.5 (random weights, bf16) at the given size and batch under
# decreasing budgets. Each run must either stay within its budget (the run's measured GPU peak:
# the device-wide high-water mark of every stage less the run's floor, the least in use at any
# stage boundary: the CUDA context and other processes, which --max-memory does not count) or be refused before loading (exit 2);
# never an out-of-memory error mid-run. Writes $OUT/ladder/*.{json,log} and prints one line per
# budget. Usage: budget_ladder.sh [SIZE] [N] [BUDGETS...]
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ladder"
unpack generate
M=/tmp/bench-sd15-bf16
if [ ! -f "$M/unet/diffusion_pytorch_model.safetensors" ]; then
  unpack sdgen-bench
  /tmp/sdgen-bench --model-dir "$M" --device cuda --dtype bf16 --width 64 --height 64 --steps 1 > /dev/null
fi
SIZE=${1:-768}; N=${2:-4}; shift 2 2>/dev/null
BUDGETS=${*:-"40GB 20GB 12GB 8GB 6GB 4GB 3GB 2.5GB 2GB"}
for b in $BUDGETS; do
  name="${SIZE}_n${N}_$b"
  /tmp/generate "a lighthouse at dusk" --model "$M" --device cuda --dtype bf16 --width "$SIZE" --height "$SIZE" \
    --n "$N" --steps 3 --max-memory "$b" --output "$OUT/ladder/$name" --json > "$OUT/ladder/$name.json" \
    2> "$OUT/ladder/$name.log"
  rc=$?
  rm -f "$OUT/ladder/$name"/*.png  # the sidecars say it all; keep what comes back small
  python3 - "$OUT/ladder/$name" "$b" "$rc" <<'PY'
import glob, json, re, sys
d, budget, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
units = {"GB": 1e9, "GIB": 2**30, "MB": 1e6, "MIB": 2**20}
m = re.fullmatch(r"([\d.]+)\s*([A-Za-z]+)", budget)
limit = float(m.group(1)) * units[m.group(2).upper()]
side = sorted(glob.glob(d + "/*.json"))
if rc != 0 or not side:
    log = open(d + ".log").read()
    if "out of memory" in log.lower():
        print(f"{budget:>7}: exit {rc}, OUT OF MEMORY mid-run")
        sys.exit()
    print(f"{budget:>7}: exit {rc}, no image (refused before loading if exit 2)")
    sys.exit()
meta = json.load(open(side[0]))
stages = meta["extra"]["memory"]
start = min(min(s["before"]["gpu"]["used_bytes"], s["after"]["gpu"]["used_bytes"]) for s in stages)
peaks = {s["label"]: (s.get("peak_gpu_bytes") or 0) - start for s in stages}
worst = max(peaks.values())
opts = meta.get("memory_optimizations")
ok = "within" if worst <= limit else "OVER"
print(f"{budget:>7}: exit 0, run peak {worst / 1e9:.2f} GB ({ok} budget), failures {len(meta.get('failures') or [])}, "
      f"options {opts}, per stage " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in peaks.items()))
PY
done
