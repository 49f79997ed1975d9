#!/usr/bin/env bash
# Issue #15's time and peak comparison with loads apart, in one device call: our whole runs under
# a budget (`sdgen-bench --max-memory`: the plan's streaming and placements, every stage's load
# timed apart from its compute, per-stage peaks device-wide and allocated), beside diffusers'
# group offload with streams on the same card (`peer_reserved.py modes|sdxl_modes`: loads
# excluded, its allocated and reserved peaks). Summaries: `budget_summary.py`.
# Order is priority; each step gets what is left of END seconds (default 540) and is skipped when
# under 30 s remain:
#   1. SD 3.5 Large 1024², 28 steps, all encoders, at each of SD35_BUDGETS ("4GB 3GB"), then
#      diffusers' group offload (denoise + decode, encoders left out);
#   2. SDXL 1024², 30 steps at each of SDXL_BUDGETS ("3GB") and resident (the issue's "≤ 1.5× its
#      resident time"), then diffusers' resident and group offload runs;
#   3. PARITY=1 first runs the tiny-model GPU parity binary (.carry/gpu_parity.xz).
# Expects .carry/sdgen-bench.xz (a CUDA build), .carry/peer_diffusers.py and .whl/ (diffusers);
# writes $OUT. The folders of random weights (~28 GB and ~7 GB) are written on first use and
# reused on a warm machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
source tools/gpu/cuda_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
END=${END:-540}; # An empty SD35_BUDGETS or SDXL_BUDGETS (set, not unset) leaves that model out.
SD35_BUDGETS=${SD35_BUDGETS-"4GB 3GB"}; SDXL_BUDGETS=${SDXL_BUDGETS-"3GB"}
M=${SD35_DIR:-/tmp/bench-sd35-large-bf16}; X=${SDXL_DIR:-/tmp/sdxl-full}
unpack sdgen-bench gpu_parity
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
left() { echo $((END - SECONDS)); }
if [ -n "${PARITY:-}" ] && [ -x /tmp/gpu_parity ]; then
  (cd crates/sdgen && SDGEN_TESTDATA=$PWD/../../testdata timeout 90 /tmp/gpu_parity --test-threads=1) \
    > "$OUT/gpu_parity.log" 2>&1
  grep -E "^test |test result" "$OUT/gpu_parity.log"
fi
bench() {  # NAME FAMILY DIR STEPS [ARGS...]: one whole run (after its warm-up), summarised
  local name=$1 family=$2 dir=$3 steps=$4 t; t=$(left); shift 4
  [ "$t" -gt 30 ] || { echo "$name: skipped (${t} s left)"; return; }
  timeout "$t" /tmp/sdgen-bench --family "$family" --model-dir "$dir" --device cuda --dtype bf16 --width 1024 \
    --height 1024 --steps "$steps" --runs 1 "$@" > "$OUT/$name.json" 2> "$OUT/$name.log" || tail -3 "$OUT/$name.log"
  python3 tools/gpu/budget_summary.py "$OUT/$name.json"; echo "  (at $SECONDS s)"
}
peer() {  # PART MODES
  local t; t=$(left); [ "$t" -gt 30 ] || { echo "peer $1: skipped"; return; }
  MODES=$2 timeout "$t" python3 tools/gpu/peer_reserved.py "$1" 2>&1 | grep -E "modes_|Error"; echo "  (at $SECONDS s)"
}
folder() {  # FAMILY DIR
  [ -f "$2/model_index.json" ] || /tmp/sdgen-bench --family "$1" --model-dir "$2" --device cuda --dtype bf16 \
    --write-only > /dev/null 2> "$OUT/write_$1.log" || tail -3 "$OUT/write_$1.log"
  echo "$1 folder ready (at $SECONDS s)"
}
if [ -n "$SD35_BUDGETS" ]; then  # SD35_BUDGETS="" runs SDXL alone
  folder sd35-large "$M"
  for b in $SD35_BUDGETS; do bench "sd35_$b" sd35-large "$M" 28 --max-memory "$b"; done
  peer modes group_offload_stream
fi
if [ -n "$SDXL_BUDGETS" ] && [ "$(left)" -gt 90 ]; then  # SDXL_BUDGETS="" runs SD 3.5 alone
  folder sdxl "$X"
  for b in $SDXL_BUDGETS; do bench "sdxl_$b" sdxl "$X" 30 --max-memory "$b"; done
  bench sdxl_resident sdxl "$X" 30
  peer sdxl_modes none,group_offload_stream
fi
echo "done (at $SECONDS s)"
