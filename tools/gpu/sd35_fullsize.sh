#!/usr/bin/env bash
# Full-size SD 3.5 Large on the GPU machine (issue #10, "Must show"), in one device call:
#  1. make: random weights at the real sizes from the bundled configs, saved in bf16 in the hub's
#     layout (~28 GB; kept for a warm machine's rerun: DIR/.made);
#  2. diffusers (carried wheel) at 1024², guidance 3.5, STEPS_PARITY steps, for DTYPES ("f32 bf16"),
#     one dtype loaded at a time; 3. ours (generate --json) with the same settings, and the
#     comparison (f32 passes at ≥ 99.5% of channels within 1/255; bf16 reported);
#  4. one whole WHOLE_STEPS (28) bf16 run: per stage its time, GPU peak above the run's floor and
#     the planner's estimate ($OUT/sd35_whole_stages.json, what the planner is fitted to);
#  5. a --max-memory ladder (BUDGETS) at BUDGET_STEPS (8: each run reloads 28 GB; the peak comes
#     in the first step) down to the first refusal (exit 2).
# Every step's failure is reported and the next one still runs; a step not started by DEADLINE_S
# (default 540 s from the start) is skipped, and each command is cut off there, so the summary
# ($OUT/sd35_fullsize.json, a compact print) is always written inside the 10-minute call.
# PARTS (default "parity whole budgets") picks steps 2–3, 4 and 5, e.g. PARTS=budgets for a rerun
# on the warm machine (its folder is reused). BUDGETS are binary, as --max-memory reads them.
# Expects .whl/ (diffusers wheel) and .carry/generate.xz (carry both). Writes into $OUT: logs,
# per-run JSON and sidecars, four parity PNGs (ours and diffusers', per dtype); no arrays.
# Smoke test on a CPU: DEVICE=cpu CONFIGS=testdata/tiny-sd35-large SIDE=64 GENERATE=target/debug/generate
#   MODEL_DIR=/tmp/sd35-tiny BUDGETS="1GB 40MB 20MB 10MB" PYTHON=/tmp/torchenv/bin/python DTYPES="f32 f16"
#   (the CPU has no bf16 matrix product; T5_SHARD=100KB TRANSFORMER_SHARD=200KB shard the tiny folder).
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OUT DTYPES=${DTYPES:-"f32 bf16"} DEVICE=${DEVICE:-cuda} SIDE=${SIDE:-1024} STEPS_PARITY=${STEPS_PARITY:-${STEPS:-4}}
PY=${PYTHON:-python3}
M=${MODEL_DIR:-/tmp/sd35-large-full}
WHOLE_STEPS=${WHOLE_STEPS:-28}; BUDGET_STEPS=${BUDGET_STEPS:-8}
BUDGETS=${BUDGETS:-"40GB 24GB 20GB 19GB 18GB 17GB 16GB 12GB 8GB"}
PARTS=${PARTS:-"parity whole budgets"}
DEADLINE=${DEADLINE_S:-540}
PROMPT="a lighthouse at dusk"; SEED=42; GUIDANCE=3.5
rm -f "$OUT/steps.jsonl" "$OUT/budgets.jsonl"
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
[ -n "${GENERATE:-}" ] || unpack generate
G=${GENERATE:-/tmp/generate}
# diffusers draws half-precision noise as this machine's torch does; tell ours which torch that is.
export SDGEN_TORCH_NOISE=$($PY -c "import torch; print(torch.__version__)")

left() { echo $((DEADLINE - SECONDS)); }
# run NAME STDOUT STDERR CMD...: CMD cut off at the deadline (STDERR the same file as STDOUT: both
# into it); one line of steps.jsonl per call (rc 124: cut off; "skipped" and return 99 when too
# little time was left to start it).
run() {
  local name=$1 out=$2 err=$3; shift 3
  if [ "$(left)" -lt 20 ]; then
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"deadline\"}" >> "$OUT/steps.jsonl"
    echo "$name: skipped (deadline)"; return 99
  fi
  local s=$SECONDS rc
  if [ "$out" = "$err" ]; then timeout -k 10 "$(left)" "$@" > "$out" 2>&1; else timeout -k 10 "$(left)" "$@" > "$out" 2> "$err"; fi
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - s))}" >> "$OUT/steps.jsonl"
  echo "$name: exit $rc ($((SECONDS - s)) s)"
  return $rc
}
# ours NAME DTYPE STEPS [ARGS...]: one generate run into $OUT/NAME/ (sidecar + PNG), its --json
# result in $OUT/NAME.json, stderr in $OUT/NAME.log.
ours() {
  local name=$1 dt=$2 steps=$3; shift 3
  rm -rf "${OUT:?}/$name"
  run "$name" "$OUT/$name.json" "$OUT/$name.log" "$G" "$PROMPT" --model "$M" --seed $SEED --steps "$steps" \
    --guidance $GUIDANCE --width "$SIDE" --height "$SIDE" --device "$DEVICE" --dtype "$dt" --output "$OUT/$name" --json "$@"
}
has() { [[ " $PARTS " == *" $1 "* ]]; }

# 1. make. Disk is 64 GB: other scripts' full-size folders go first; never an f32 copy.
if [ "$DEVICE" = cuda ]; then
  rm -rf /tmp/bench-sd35-large-bf16 /tmp/bench-sd35-medium-bf16
  free=$(df -B1 --output=avail /tmp | tail -1)
  if [ ! -f "$M/.made" ] && [ "$free" -lt 34000000000 ]; then
    echo "only $((free / 1000000000)) GB free: removing other scripts' model folders"; rm -rf /tmp/bench-* /tmp/sdxl-full
  fi
fi
df -h /tmp | tail -1
if [ -f "$M/.made" ]; then echo "reusing $M"; echo '{"step": "make", "rc": 0, "seconds": 0, "reused": true}' >> "$OUT/steps.jsonl"
else run make "$OUT/make.log" "$OUT/make.log" $PY tools/gpu/sd35_fullsize.py make "$M"; fi
tail -2 "$OUT/make.log" 2>/dev/null
cp "$M/made.json" "$OUT/made.json" 2>/dev/null
du -sh "$M"/* 2>/dev/null | tr '\n' ' '; echo

# 2. diffusers, then 3. ours and the comparison (only with a finished folder).
if [ ! -f "$M/.made" ]; then
  echo "no finished model folder: the other steps are skipped"
else
  if has parity; then
    run diffusers "$OUT/diffusers.log" "$OUT/diffusers.log" $PY tools/gpu/sd35_fullsize.py diffusers "$M"
    grep -E "^(f32|bf16|f16) " "$OUT/diffusers.log"
    for dt in $DTYPES; do
      ours "ours-$dt" "$dt" "$STEPS_PARITY"; grep -iE "^error|panic" "$OUT/ours-$dt.log" 2>/dev/null | head -3
    done
    run compare "$OUT/compare.log" "$OUT/compare.log" $PY tools/gpu/sd35_fullsize.py compare; cat "$OUT/compare.log" 2>/dev/null
    for dt in $DTYPES; do  # one PNG per side and dtype comes back; the arrays stay behind
      for f in "$OUT/ours-$dt"/*.png; do [ -e "$f" ] && mv "$f" "$OUT/ours-$dt.png"; done
    done
    rm -f "$OUT"/diffusers-*.npy
  fi
  # 4. the whole run: all three encoders, WHOLE_STEPS steps, bf16 (f32 with DEVICE=cpu, which has
  # no bf16 matrix product).
  WDT=bf16; [ "$DEVICE" = cpu ] && WDT=f32
  if has whole; then
    ours whole "$WDT" "$WHOLE_STEPS"; grep -iE "^error|panic" "$OUT/whole.log" 2>/dev/null | head -3
    $PY tools/gpu/sd35_fullsize.py whole "$OUT/whole" 2>&1 | tee "$OUT/whole_table.txt"
    rm -f "$OUT/whole"/*.png
  fi
  # 5. the budget ladder, down to the first refusal.
  if has budgets; then
    mkdir -p "$OUT/budgets"
    for b in $BUDGETS; do
      ours "budgets/$b" "$WDT" "$BUDGET_STEPS" --max-memory "$b"; rc=$?
      [ $rc = 99 ] && break  # the deadline
      $PY tools/gpu/sd35_fullsize.py budget "$OUT/budgets/$b" "$b" "$rc"
      rm -f "$OUT/budgets/$b"/*.png
      [ $rc = 2 ] && break
    done
  fi
fi
$PY tools/gpu/sd35_fullsize.py summary
ls -la "$OUT" | head -40
