#!/usr/bin/env bash
# The CUDA speed work's measurements in one device call (issue: speed on CUDA), ours beside
# diffusers on the same card. PARTS picks (default "ops bench peer"):
#   ops      the GPU test binary: every fast kernel against the stock path and an f32 CPU reference
#            at SD 1.5's and SDXL's real shapes (crates/sdgen-models/tests/gpu_ops.rs);
#   bench    `sdgen-bench --component` (loads apart, device synchronised per evaluation): the SDXL
#            UNet evaluation at 1024² with the CFG batch, the SDXL VAE decode at 1024² (also with
#            its decoder channels-first, SDGEN_CHANNELS_LAST=0), the SD 1.5 UNet at 512², each with
#            the fast kernels and with --no-fast-kernels; peaks device-wide and allocated;
#   peer     peer_diffusers.py sdxl sd15 (the same figures for diffusers);
#   ncu      per-kernel breakdown of one evaluation each, ours (ncu, the last evaluation only)
#            and diffusers' (torch.profiler, tools/gpu/peer_profile.py);
#   pipeline sdgen-bench whole SDXL runs (1024², 30 steps; load and per-evaluation times apart);
#   parity   full-size SDXL (bf16) and SD 1.5 (f32) images against diffusers' with the fast kernels
#            (tools/gpu/sdxl_fullsize.sh, fullsize_sd15.sh).
# COMPONENTS (default "unet vae") narrows the SDXL benches; BENCH_KINDS (default "fast stock") the
# kernel sets benched (and run whole); PEER_PROFILE=0 skips diffusers' profile in the ncu part; QUICK=1 skips the cuBLAS-attention variants and the tiny-model parity binary; FAMILIES (default
# "sdxl sd15") and PEER_PARTS (default "sdxl sd15") narrow the bench and peer
# parts. Expects .carry/{generate,sdgen-bench,gpu_ops,gpu_parity}.xz, .carry/peer_diffusers.py and .whl/ (the
# diffusers wheel); writes logs and JSON under $OUT/speed and a summary to stdout.
set -uo pipefail
OUT=${OUT:-/tmp/out}; S_DIR="$OUT/speed"; mkdir -p "$S_DIR"
PARTS=${PARTS:-ops bench peer}
source "$(dirname "$0")/cuda_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
unpack generate sdgen-bench gpu_ops gpu_parity
# Our CUDA kernels on (whatever the build's default), unless a run says --no-fast-kernels.
export SDGEN_FAST_KERNELS=1
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
timed() { local s=$SECONDS; "$@"; local rc=$?; echo "  ($((SECONDS - s)) s, exit $rc)"; return $rc; }

if has ops; then
  echo "== ops: fast kernels vs stock vs f32 CPU reference at real shapes"
  timed /tmp/gpu_ops --test-threads=1 --nocapture > "$S_DIR/gpu_ops.log" 2>&1
  grep -E "fast .*stock|test result|panicked|FAILED" "$S_DIR/gpu_ops.log" | tail -80
  if [ -z "${QUICK:-}" ]; then
  echo "== ops: half-precision attention through the cuBLAS path (SDGEN_ATTENTION=cublas)"
  SDGEN_ATTENTION=cublas timed /tmp/gpu_ops attention --test-threads=1 --nocapture > "$S_DIR/gpu_ops_cublas.log" 2>&1
  grep -E "fast .*stock|test result|panicked|FAILED" "$S_DIR/gpu_ops_cublas.log" | tail -30
  echo "== ops: tiny-model pipelines on CUDA (fast kernels) against diffusers and our CPU run"
  SDGEN_TESTDATA=$PWD/testdata timed /tmp/gpu_parity --test-threads=1 --nocapture > "$S_DIR/gpu_parity.log" 2>&1
  grep -E "test result|panicked|FAILED|within" "$S_DIR/gpu_parity.log" | tail -20
  fi
fi

write() {  # family dir
  [ -f "$2/model_index.json" ] || /tmp/sdgen-bench --family "$1" --model-dir "$2" --device cuda --dtype bf16 --write-only > /dev/null 2> "$S_DIR/write_$1.log" || tail -5 "$S_DIR/write_$1.log"
}
component() {  # name family dir size component [extra...]
  local name=$1 fam=$2 dir=$3 size=$4 comp=$5; shift 5
  /tmp/sdgen-bench --family "$fam" --model-dir "$dir" --device cuda --dtype bf16 --width "$size" --height "$size" \
    --component "$comp" --iterations 7 "$@" > "$S_DIR/$name.json" 2> "$S_DIR/$name.log"
  python3 - "$S_DIR/$name.json" "$name" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"  {sys.argv[2]}: no result ({e})"); sys.exit()
res = r["result"]; ev = res["timed"]["eval"]; mem = res["timed"]["memory"]
peak = (mem.get("peak_gpu_bytes") or 0) / 1e9
allocated = (mem.get("peak_gpu_allocated_bytes") or 0) / 1e9
print(f"  {sys.argv[2]:<28} median {ev['median_ms']:8.1f} ms (min {ev['min_ms']:.1f}, max {ev['max_ms']:.1f}), "
      f"load {res['load_ms'] / 1e3:.2f} s, GPU peak {peak:.2f} GB device-wide, {allocated:.2f} GB allocated  [{r['kernels']}]")
PY
}

if has bench || has ncu; then
  timed write sdxl /tmp/sdxl
  case " ${FAMILIES:-sdxl sd15} " in *" sd15 "*) timed write sd15 /tmp/sd15;; esac
fi
if has bench; then
  echo "== bench: one evaluation, loads excluded (bf16)"
  for k in ${BENCH_KINDS:-fast stock}; do
    extra=(); [ $k = stock ] && extra=(--no-fast-kernels)
    component "sdxl_unet_1024_b2_$k" sdxl /tmp/sdxl 1024 unet "${extra[@]}"
    case " ${COMPONENTS:-unet vae} " in *" vae "*) component "sdxl_vae_1024_$k" sdxl /tmp/sdxl 1024 vae "${extra[@]}"
      # The decoder channels-first as before (SDGEN_CHANNELS_LAST=0), beside the default.
      [ $k = fast ] && SDGEN_CHANNELS_LAST=0 component "sdxl_vae_1024_fast_channels_first" sdxl /tmp/sdxl 1024 vae;;
    esac
    case " ${FAMILIES:-sdxl sd15} " in *" sd15 "*) component "sd15_unet_512_b2_$k" sd15 /tmp/sd15 512 unet "${extra[@]}";; esac
  done
  [ -z "${QUICK:-}" ] && SDGEN_ATTENTION=cublas component "sdxl_unet_1024_b2_fast_cublas_attention" sdxl /tmp/sdxl 1024 unet
fi
if has peer || has ncu; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
fi
if has peer; then
  echo "== peer: diffusers on the same card"
  OUT="$S_DIR" timed python3 .carry/peer_diffusers.py ${PEER_PARTS:-sdxl sd15} > "$S_DIR/peer.log" 2>&1
  grep -E "_ms|_GB" "$S_DIR/peer.log"
fi
if has ncu; then
  echo "== ncu: one evaluation's kernels (ours), torch.profiler (diffusers)"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for k in ${NCU_KERNELS:-fast stock}; do
    for comp in ${NCU_COMPONENTS:-unet vae}; do
      extra=(); [ $k = stock ] && extra=(--no-fast-kernels)
      SDGEN_PROFILE_LAST=1 timed timeout 240 "$NCU" --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
        --print-summary per-kernel --csv /tmp/sdgen-bench --family sdxl --model-dir /tmp/sdxl --device cuda --dtype bf16 \
        --width 1024 --height 1024 --component $comp --iterations 1 "${extra[@]}" > "$S_DIR/ncu_${comp}_$k.csv" 2> "$S_DIR/ncu_${comp}_$k.log"
      python3 tools/gpu/ncu_summary.py "$S_DIR/ncu_${comp}_$k.csv" "sdxl $comp $k" | tee "$S_DIR/ncu_${comp}_$k.txt"
    done
  done
  if [ "${PEER_PROFILE:-1}" = 1 ]; then
    OUT="$S_DIR" timed python3 tools/gpu/peer_profile.py > "$S_DIR/peer_profile.txt" 2>&1
    cat "$S_DIR/peer_profile.txt"
  fi
fi
if has pipeline; then
  echo "== pipeline: whole runs (bf16; SDXL 1024², 30 steps; SD 1.5 512², 20 steps), loads apart"
  for k in ${BENCH_KINDS:-fast stock}; do
    extra=(); [ $k = stock ] && extra=(--no-fast-kernels)
    for spec in ${PIPELINES:-sdxl:1024:30:/tmp/sdxl sd15:512:20:/tmp/sd15}; do
      IFS=: read -r fam px steps dir <<< "$spec"
      write "$fam" "$dir"  # random weights unless the folder is already a model
      /tmp/sdgen-bench --family $fam --model-dir $dir --device cuda --dtype bf16 --width $px --height $px --steps $steps \
        "${extra[@]}" > "$S_DIR/pipeline_${fam}_$k.json" 2> "$S_DIR/pipeline_${fam}_$k.log"
      python3 - "$S_DIR/pipeline_${fam}_$k.json" "$fam $k" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); run = r["runs"][0]; c = run["clock"]
loads = sum(c["load_ms"].values())
peaks = {m["label"]: round((m.get("peak_gpu_allocated_bytes") or 0) / 1e9, 2) for m in run.get("memory", [])}
print(f"  {sys.argv[2]}: total {run['total_ms'] / 1e3:.2f} s, without loads {(run['total_ms'] - loads) / 1e3:.2f} s, "
      f"stages { {k: round(v) for k, v in run['timings_ms'].items()} } ms, loads { {k: round(v) for k, v in c['load_ms'].items()} } ms, "
      f"{c['evaluations']} evaluations, median {c['evaluation_median_ms']:.1f} ms, allocated peaks GB {peaks}")
PY
    done
  done
fi
if has parity; then
  echo "== parity: full-size images against diffusers, fast kernels"
  OUT="$S_DIR/sdxl_parity" timed bash tools/gpu/sdxl_fullsize.sh > "$S_DIR/sdxl_parity.log" 2>&1
  grep -iE "within|max|exit" "$S_DIR/sdxl_parity.log" | tail -12
  OUT="$S_DIR/sd15_parity" timed bash tools/gpu/fullsize_sd15.sh > "$S_DIR/sd15_parity.log" 2>&1
  grep -iE "within|max|exit" "$S_DIR/sd15_parity.log" | tail -12
fi
tar czf "$OUT/speed.tgz" -C "$OUT" speed 2>/dev/null
