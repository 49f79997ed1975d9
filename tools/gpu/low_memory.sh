#!/usr/bin/env bash
# Issue #15's GPU figures, in one device call per family (FAMILY: sd35-large, default, or sdxl):
# a full-size bf16 folder of random weights (`sdgen-bench --write-only`: SD 3.5 Large ~28 GB in
# ~50 s, SDXL ~7 GB; reused when a warm machine has it), then ours at 1024²
# (STEPS: 28 / 30), all encoders — resident, then under each of BUDGETS ("8GB 4GB" / "3GB": block
# streaming and whatever else the planner picks) — each run's per-stage time and measured peak
# (`sd35_fullsize.py whole|budget`, which read any family's sidecar) and its image against the
# resident one (`compare_png.py`: streaming changes no number, so anything but identical needs a
# reason, e.g. a tiled decode); then diffusers' memory modes on the same card (`peer_diffusers.py
# modes|sdxl_modes`, MODES default "none,group_offload_stream": denoise + decode, encoders left
# out, loads excluded).
# Expects .whl/ (diffusers wheel), .carry/generate.xz, .carry/sdgen-bench.xz and
# .carry/peer_diffusers.py; writes $OUT.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT DEVICE=cuda SIDE=1024
FAMILY=${FAMILY:-sd35-large}
case $FAMILY in
  sd35-large) M=${MODEL_DIR:-/tmp/bench-sd35-large-bf16}; STEPS=${STEPS:-28}; BUDGETS=${BUDGETS:-"8GB 4GB"}
    GUIDANCE=3.5; PEER=modes ;;
  sdxl) M=${MODEL_DIR:-/tmp/sdxl-full}; STEPS=${STEPS:-30}; BUDGETS=${BUDGETS:-"3GB"}; GUIDANCE=5; PEER=sdxl_modes ;;
  *) echo "FAMILY: sd35-large or sdxl, not $FAMILY"; exit 2 ;;
esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
unpack generate sdgen-bench
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader
S=$SECONDS
[ -f "$M/model_index.json" ] || /tmp/sdgen-bench --family "$FAMILY" --model-dir "$M" --device cuda --dtype bf16 \
  --write-only > "$OUT/make.log" 2>&1 || { tail -5 "$OUT/make.log"; exit 1; }
echo "folder ready ($((SECONDS - S)) s)"
ours() {  # NAME [ARGS...]: one run into $OUT/NAME/ (sidecar + PNG), its log in $OUT/NAME.log
  local name=$1; shift; rm -rf "${OUT:?}/$name"; local s=$SECONDS
  timeout "${RUN_TIMEOUT:-170}" /tmp/generate "a lighthouse at dusk" --model "$M" --seed 42 --steps "$STEPS" \
    --guidance $GUIDANCE --width 1024 --height 1024 --device cuda --dtype bf16 --output "$OUT/$name" --json "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?; echo "$name: exit $rc ($((SECONDS - s)) s wall, loads included)"; return $rc
}
ours resident && python3 tools/gpu/sd35_fullsize.py whole "$OUT/resident" | tee "$OUT/resident_table.txt"
for b in $BUDGETS; do
  ours "budget_$b" --max-memory "$b"; rc=$?
  python3 tools/gpu/sd35_fullsize.py budget "$OUT/budget_$b" "$b" "$rc"
  [ $rc = 0 ] && python3 tools/gpu/sd35_fullsize.py whole "$OUT/budget_$b" | tee "$OUT/budget_${b}_table.txt"
  python3 tools/gpu/compare_png.py "$OUT"/resident/*.png "$OUT/budget_$b"/*.png
done
MODES=${MODES:-none,group_offload_stream} timeout "${PEER_TIMEOUT:-240}" python3 .carry/peer_diffusers.py $PEER \
  > "$OUT/peer.log" 2>&1
grep -E "modes_" "$OUT/peer.log" || tail -5 "$OUT/peer.log"
