#!/usr/bin/env bash
# Issue #15's quantised must-show in one device call: SD 3.5 Large at 1024², STEPS (28) steps,
# all three encoders, with the MMDiT as a Q8_0 GGUF and as an fp8-scaled checkpoint — each
# file's time and peak under each of BUDGETS ("8GB 4GB"), its image against the bf16 resident
# image, and the error of one MMDiT forward against bf16 (relative L2, beside the published
# expectation for Q8_0: near-lossless). Nothing is downloaded and no Python quantises:
#  1. make: the bf16 folder of random weights (`sdgen-bench --write-only`, ~28 GB in ~50 s; the
#     one low_memory.sh writes, reused on a warm machine);
#  2. export: our bench writes the quantised files from it (`sdgen-bench --export q8_0|fp8-scaled`:
#     city96's GGUF layout, ~8.7 GB; Stability's/ComfyUI's fp8-scaled checkpoint, ~8.4 GB, its
#     text encoders hard-linked into text_encoders/ beside it), reused when there;
#  3. error: per format, `sdgen-bench --component transformer --weights-file FILE` at 1024² with
#     CFG (one evaluation after one warm-up; the bf16 forward first, on the same inputs): relative
#     L2, the quantised evaluation's time and allocated peak, both loads;
#     the inputs are `sd35_forward.py inputs`' seeded ones, so that
#  3b. peer: diffusers' forward of the same bf16 folder and of our Q8_0 GGUF (its `gguf`-package
#     reader, an independent check of the file) on the same inputs, timed, with the relative L2
#     between them: the Q8_0 expectation on these very weights (`peer_quantised.py`; needs .whl/
#     with the diffusers and gguf wheels: `pip download --no-deps gguf`, pure Python, 120 kB);
#  4. resident: `generate` on the bf16 folder, no budget: the reference image;
#  5. budgets: per budget, per format, `generate --model FILE --config-from FOLDER --max-memory B`:
#     exit, per-stage time and measured peak above the floor against the budget
#     (`sd35_fullsize.py budget|whole`), the image against the resident one (`compare_png.py`:
#     reported only — a quantised image is not expected to equal the bf16 one).
# Order is priority: a step not started by DEADLINE_S (540 s from the start) is skipped with a
# line saying so, and each command is cut off there, so the summary ($OUT/quantised_summary.json,
# printed) is always written inside the 10-minute call. FORMATS ("q8_0 fp8-scaled") and PARTS
# ("export error peer resident budgets"; "bench" adds each file under each budget as a whole
# `sdgen-bench --max-memory` run, loads timed apart) pick what runs.
# KERNEL_ERROR=0 leaves out step 3's second Q8_0 error, through candle's MMQ kernels.
# Expects .carry/generate.xz and .carry/sdgen-bench.xz (CUDA builds), and .whl/ for the peer step
# (torch, numpy and PIL are the machine's). Writes into $OUT: logs, --json results, sidecars, one
# PNG per run.
# Smoke test on this CPU (the tiny SD 3.5 Large, its folder used as it is; f32: quick):
#   DEVICE=cpu DTYPE=f32 SIDE=64 STEPS=2 MODEL_DIR=testdata/tiny-sd35-large FILES_DIR=/tmp/q15-files
#   BUDGETS="1GB 300MB" GENERATE=target/debug/generate BENCH=target/debug/sdgen-bench
#   PY=/tmp/torchenv/bin/python OUT=/tmp/q15-out bash tools/gpu/low_memory_quantised.sh
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}; export OUT DEVICE; DTYPE=${DTYPE:-bf16}; SIDE=${SIDE:-1024}; STEPS=${STEPS:-28}
BUDGETS=${BUDGETS:-"8GB 4GB"}; FORMATS=${FORMATS:-"q8_0 fp8-scaled"}
PARTS=${PARTS:-"export error peer resident budgets"}
M=${MODEL_DIR:-/tmp/bench-sd35-large-bf16}; Q=${FILES_DIR:-/tmp/sd35-large-quantised}
PY=${PY:-python3}; DEADLINE=${DEADLINE_S:-540}
G=${GENERATE:-/tmp/generate}; B=${BENCH:-/tmp/sdgen-bench}
unpack generate sdgen-bench
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
rm -f "$OUT/steps.jsonl"

left() { echo $((DEADLINE - SECONDS)); }
has() { [[ " $PARTS " == *" $1 "* ]]; }
# run NAME LOG CMD...: CMD (stdout to $OUT/NAME.json, stderr to LOG) cut off at the deadline; one
# line of steps.jsonl per call ("skipped" and return 99 when too little time is left to start it).
run() {
  local name=$1 log=$2; shift 2
  if [ "$(left)" -lt 30 ]; then
    echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"deadline\"}" >> "$OUT/steps.jsonl"
    echo "$name: skipped (deadline)"; return 99
  fi
  local s=$SECONDS rc
  mkdir -p "$(dirname "$OUT/$name")"
  timeout -k 10 "$(left)" "$@" > "$OUT/$name.json" 2> "$log"; rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - s))}" >> "$OUT/steps.jsonl"
  echo "$name: exit $rc ($((SECONDS - s)) s)"
  [ $rc = 0 ] || tail -4 "$log"
  return $rc
}
# The file each format is written to (the published files' names).
file_of() { case $1 in q8_0) echo "$Q/sd3.5_large-Q8_0.gguf" ;; fp8-scaled) echo "$Q/fp8/sd3.5_large_fp8_scaled.safetensors" ;; esac; }
# ours NAME MODEL [ARGS...]: one generate run into $OUT/NAME/ (sidecar + PNG).
ours() {
  local name=$1 model=$2; shift 2; rm -rf "${OUT:?}/$name"
  run "$name" "$OUT/$name.log" "$G" "a lighthouse at dusk" --model "$model" --seed 42 --steps "$STEPS" \
    --guidance 3.5 --width "$SIDE" --height "$SIDE" --device "$DEVICE" --dtype "$DTYPE" --output "$OUT/$name" --json "$@"
}

# 1. make (the disk is 64 GB: the folder ~28 GB and the two files ~17 GB; other scripts' go first).
if [ "$DEVICE" = cuda ] && [ ! -f "$M/model_index.json" ]; then
  rm -rf /tmp/sd35-large-full /tmp/sdxl-full /tmp/bench-sd35-medium-bf16
fi
df -h "$(dirname "$M")" | tail -1
run make "$OUT/make.log" "$B" --family sd35-large --model-dir "$M" --device "$DEVICE" --dtype "$DTYPE" --write-only \
  || { echo "no model folder: nothing else can run"; exit 1; }

# 2. the quantised files, from the folder (kept for a warm machine's rerun).
if has export; then
  for f in $FORMATS; do
    out=$(file_of "$f")
    if [ -f "$out" ]; then echo "reusing $out"; continue; fi
    run "export_$f" "$OUT/export_$f.log" "$B" --family sd35-large --model-dir "$M" --export "$f" --export-to "$out"
  done
  ls -la "$Q" "$Q/fp8" "$Q/fp8/text_encoders" 2>/dev/null
fi

# 3. one MMDiT forward's error against bf16, with its time and peak, on seeded inputs (random ones
# if torch cannot write them); 3b. diffusers' on the same inputs.
INPUTS=()
OUT=$OUT SIDE=$SIDE $PY tools/gpu/sd35_forward.py inputs "$M" > "$OUT/inputs.log" 2>&1 \
  && INPUTS=(--inputs "$OUT/inputs.safetensors")
error() {  # NAME FORMAT [ARGS...]
  local name=$1 f=$2; shift 2
  run "$name" "$OUT/$name.log" "$B" --family sd35-large --model-dir "$M" --device "$DEVICE" --dtype "$DTYPE" \
    --component transformer --width "$SIDE" --height "$SIDE" --iterations 1 --warmup 1 "${INPUTS[@]}" \
    --weights-file "$(file_of "$f")" "$@"
}
if has error; then
  for f in $FORMATS; do error "error_$f" "$f"; done
  # GGUF blocks through candle's MMQ kernels instead of dequantised (the device's default).
  [[ " $FORMATS " == *" q8_0 "* ]] && [ "${KERNEL_ERROR:-1}" = 1 ] \
    && error error_q8_0_kernel q8_0 --quantised-path kernel
fi
if has peer && [ ${#INPUTS[@]} -gt 0 ]; then
  run peer "$OUT/peer.log" $PY tools/gpu/peer_quantised.py "$M" "$(file_of q8_0)"
  rm -f "$OUT/peer.json"  # its print is in the log; the figures in peer_quantised.json
fi

# 4a. each file under each budget as whole bench runs: loads timed apart from compute, peaks
# device-wide and allocated (one run, no warm-up run: the streamed weights are pinned once).
if has bench; then
  for b in $BUDGETS; do
    for f in $FORMATS; do
      run "bench_${b}_$f" "$OUT/bench_${b}_$f.log" "$B" --family sd35-large --model-dir "$M" --device "$DEVICE" \
        --dtype "$DTYPE" --width "$SIDE" --height "$SIDE" --steps "$STEPS" --runs 1 --warmup 0 \
        --weights-file "$(file_of "$f")" --max-memory "$b" \
        && $PY tools/gpu/budget_summary.py "$OUT/bench_${b}_$f.json"
    done
  done
fi

# 4b. the bf16 resident image, 5. each file under each budget.
if has resident; then
  ours resident "$M"
  [ -f "$OUT/resident.json" ] && $PY tools/gpu/sd35_fullsize.py whole "$OUT/resident" > "$OUT/resident_table.txt" 2>&1
fi
if has budgets; then
  for b in $BUDGETS; do
    for f in $FORMATS; do
      name="budget_${b}_$f"
      ours "$name" "$(file_of "$f")" --config-from "$M" --max-memory "$b"; rc=$?
      [ $rc = 99 ] && continue
      rm -f "$OUT/budgets.jsonl"
      $PY tools/gpu/sd35_fullsize.py budget "$OUT/$name" "$b" "$rc" > /dev/null 2>&1
      mv "$OUT/budgets.jsonl" "$OUT/$name.budget.json" 2>/dev/null
      if [ $rc = 0 ] && ls "$OUT"/resident/*.png > /dev/null 2>&1; then
        $PY tools/gpu/compare_png.py "$OUT"/resident/*.png "$OUT/$name"/*.png > "$OUT/$name.image.json"
      fi
    done
  done
fi

rm -f "$OUT/inputs.safetensors"  # 13 MB at 1024², not worth bringing back
# The summary: every figure above in one JSON, and a compact print.
$PY - "$OUT" "$BUDGETS" "$FORMATS" <<'EOF'
import json, os, sys
out, budgets, formats = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            text = f.read().strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:  # a --json result: its last line
            return json.loads(text.splitlines()[-1])
    except (OSError, ValueError) as e:
        return {"unreadable": str(e)}

def lines(name):
    try:
        return [json.loads(l) for l in open(os.path.join(out, name))]
    except OSError:
        return []

steps = {s["step"]: s for s in lines("steps.jsonl")}
summary = {"expectation": "Q8_0 near-lossless: relative L2 of the MMDiT output ~1e-3..1e-2 against 16-bit "
                          "(city96's conversions; the tiny model's 3.5e-3..8e-3); fp8 about 2..5x Q8_0's",
           "steps": steps, "peer_diffusers": load("peer_quantised.json"), "formats": {}}
for f in formats:
    row = {"export": (load(f"export_{f}.json") or {}).get("exported"),
           "export_ms": (load(f"export_{f}.json") or {}).get("export_ms")}
    err = load(f"error_{f}.json") or {}
    res = err.get("result") or {}
    row["mmdit"] = {"relative_l2_vs_bf16": (res.get("against_unquantised") or {}).get("relative_l2"),
                    "against_unquantised": res.get("against_unquantised"), "load_ms": res.get("load_ms"),
                    "eval": (res.get("timed") or {}).get("eval"), "memory": (res.get("timed") or {}).get("memory")}
    row["budgets"] = {}
    for b in budgets:
        name = f"budget_{b}_{f}"
        row["budgets"][b] = {"step": steps.get(name), "image_vs_bf16_resident": load(f"{name}.image.json"),
                             "budget": load(f"{name}.budget.json")}
    summary["formats"][f] = row
kres = ((load("error_q8_0_kernel.json") or {}).get("result") or {})
summary["q8_0_kernel_path"] = {"relative_l2_vs_bf16": (kres.get("against_unquantised") or {}).get("relative_l2"),
                               "eval": (kres.get("timed") or {}).get("eval")}
with open(os.path.join(out, "quantised_summary.json"), "w") as fh:
    json.dump(summary, fh, indent=1)
print("expectation:", summary["expectation"])
peer = summary["peer_diffusers"] or {}
print(f"diffusers on the same inputs: Q8_0 GGUF vs bf16 relative L2 {peer.get('relative_l2_q8_0_vs_bf16')}, "
      f"bf16 {peer.get('bf16')}, Q8_0 {peer.get('q8_0')}")
k = summary["q8_0_kernel_path"]
print(f"q8_0 through candle's MMQ kernels: relative L2 vs bf16 {k['relative_l2_vs_bf16']}, "
      f"eval {(k['eval'] or {}).get('median_ms')} ms")
for f, row in summary["formats"].items():
    e, m = row["export"] or {}, row["mmdit"]
    print(f"{f}: file {e.get('file_bytes', 0) / 1e9:.2f} GB written in {(row['export_ms'] or 0) / 1e3:.1f} s "
          f"{e.get('types')}; MMDiT relative L2 vs bf16 {m['relative_l2_vs_bf16']}, "
          f"eval {(m['eval'] or {}).get('median_ms')} ms")
    for b, r in row["budgets"].items():
        s, img, bud = r["step"] or {}, r["image_vs_bf16_resident"] or {}, r["budget"] or {}
        print(f"  {b}: exit {s.get('rc')} ({s.get('seconds')} s wall, loads included), "
              f"peak {bud.get('run_peak_bytes', 0) / 2**30:.2f} GiB {bud.get('result', '-')}, "
              f"image vs bf16: mean {img.get('mean')}/255, max {img.get('max')}, within 1/255 {img.get('within_1_pct')}%")
EOF
