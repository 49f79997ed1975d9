#!/usr/bin/env bash
# What block streaming costs on this card: one denoiser evaluation (`sdgen-bench --component
# unet|transformer`, CFG batch, bf16, loads apart) resident and with K blocks resident (RESIDENT,
# default "0"), each with its allocated GPU peak. The weights not held resident are about the
# resident peak less the streamed one, so that difference over the extra time per evaluation is
# the effective upload bandwidth the planner's streaming rung should assume (STREAM_BANDWIDTH).
# Usage: COMPONENT=unet FAMILY=sdxl DIR=/tmp/sdxl-full SIZE=1024 bash tools/gpu/stream_bandwidth.sh
# Expects .carry/sdgen-bench.xz (a CUDA build); writes $OUT/stream/.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; D="$OUT/stream"; mkdir -p "$D"
COMPONENT=${COMPONENT:-unet}; FAMILY=${FAMILY:-sdxl}; DIR=${DIR:-/tmp/sdxl-full}; SIZE=${SIZE:-1024}
unpack sdgen-bench
for k in resident ${RESIDENT:-0}; do
  extra=(); [ "$k" = resident ] || extra=(--resident-blocks "$k")
  /tmp/sdgen-bench --family "$FAMILY" --model-dir "$DIR" --device cuda --dtype bf16 --width "$SIZE" --height "$SIZE" \
    --component "$COMPONENT" --iterations "${ITERATIONS:-3}" --warmup 1 "${extra[@]}" \
    > "$D/${COMPONENT}_$k.json" 2> "$D/${COMPONENT}_$k.log" || tail -3 "$D/${COMPONENT}_$k.log"
done
python3 - "$D" "$COMPONENT" ${RESIDENT:-0} <<'PY' | tee "$D/summary.txt"
import json, sys
d, comp, ks = sys.argv[1], sys.argv[2], sys.argv[3:]
def load(k):
    try:
        res = json.load(open(f"{d}/{comp}_{k}.json"))["result"]
    except Exception as e:
        return None
    ev, mem = res["timed"]["eval"], res["timed"]["memory"]
    return ev["median_ms"], (mem.get("peak_gpu_allocated_bytes") or 0) / 1e9, res["load_ms"]
base = load("resident")
if base is None:
    sys.exit(print("no resident result"))
print(f"{comp} resident: {base[0]:.1f} ms/evaluation, {base[1]:.2f} GB allocated, load {base[2] / 1e3:.2f} s")
for k in ks:
    r = load(k)
    if r is None:
        print(f"{comp} {k} resident blocks: no result"); continue
    moved, extra_s = base[1] - r[1], (r[0] - base[0]) / 1e3
    bw = f"{moved / extra_s:.1f} GB/s" if extra_s > 0 else "n/a"
    print(f"{comp} {k} resident blocks: {r[0]:.1f} ms/evaluation, {r[1]:.2f} GB allocated, load {r[2] / 1e3:.2f} s; "
          f"~{moved:.2f} GB uploaded per evaluation in {extra_s * 1e3:.0f} ms extra: {bw}")
PY
