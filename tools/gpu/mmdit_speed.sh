#!/usr/bin/env bash
# SD 3.5's MMDiT on CUDA beside diffusers, one device call: our transformer evaluation at 1024²
# with the CFG batch (sdgen-bench --component transformer, loads apart), its per-kernel breakdown
# (ncu, the last evaluation only) and diffusers' (torch.profiler, peer_profile.py sd35), and
# diffusers' timing (peer_diffusers.py sd35); `ops` first runs the fused DiT kernels' GPU tests
# at the real shapes (.carry/gpu_ops.xz). MODEL (default sd35-large) picks the family; PARTS
# (default "ops bench ncu peer") narrows it; EXTRA passes flags to our runs. A
# .carry/sdgen-bench-before.xz (an earlier build) is benched beside the current one.
# Expects .carry/sdgen-bench.xz, .carry/peer_diffusers.py and .whl/; writes $OUT/mmdit/.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; D="$OUT/mmdit"; mkdir -p "$D"
PARTS=${PARTS:-ops bench ncu peer}
MODEL=${MODEL:-sd35-large}; DIR=${DIR:-/tmp/bench-$MODEL-bf16}  # DIR: any folder of that family
has() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
unpack sdgen-bench sdgen-bench-before gpu_ops
if has ops && [ -x /tmp/gpu_ops ]; then
  echo "== ops: the fused DiT kernels against the stock path at SD 3.5's shapes"
  /tmp/gpu_ops adaptive_norms packed_heads --test-threads=1 --nocapture > "$D/gpu_ops.log" 2>&1
  grep -E "fast vs stock|test result|panicked" "$D/gpu_ops.log" | tail -40
fi
S=$SECONDS
[ -f "$DIR/model_index.json" ] || /tmp/sdgen-bench --family "$MODEL" --model-dir "$DIR" --device cuda --dtype bf16 --write-only > /dev/null 2> "$D/write.log" || tail -5 "$D/write.log"
echo "folder ready ($((SECONDS - S)) s)"
bench() {  # binary name [extra...]
  local bin=$1 name=$2; shift 2
  /tmp/$bin --family "$MODEL" --model-dir "$DIR" --device cuda --dtype bf16 --width 1024 --height 1024 \
    --component transformer --iterations 7 "$@" > "$D/$name.json" 2> "$D/$name.log"
  python3 - "$D/$name.json" "$name" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"  {sys.argv[2]}: no result ({e})"); sys.exit()
res = r["result"]; ev = res["timed"]["eval"]; mem = res["timed"]["memory"]
print(f"  {sys.argv[2]:<28} median {ev['median_ms']:8.1f} ms (min {ev['min_ms']:.1f}, max {ev['max_ms']:.1f}), "
      f"load {res['load_ms'] / 1e3:.2f} s, GPU peak {(mem.get('peak_gpu_bytes') or 0) / 1e9:.2f} GB device-wide, "
      f"{(mem.get('peak_gpu_allocated_bytes') or 0) / 1e9:.2f} GB allocated  [{r['kernels']}]")
PY
}
if has bench; then
  echo "== ours: one transformer evaluation (CFG batch), bf16, 1024²"
  bench sdgen-bench "transformer_${MODEL}" ${EXTRA:-}
  [ -x /tmp/sdgen-bench-before ] && bench sdgen-bench-before "transformer_${MODEL}_before" ${EXTRA:-}
fi
if has peer; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  OUT="$D" python3 tools/gpu/peer_profile.py sd35 > "$D/peer_profile.txt" 2>&1; cat "$D/peer_profile.txt" | head -40
  OUT="$D" python3 .carry/peer_diffusers.py sd35 > "$D/peer.log" 2>&1; grep -E "_ms|_GB" "$D/peer.log"
fi
if has ncu; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  SDGEN_PROFILE_LAST=1 timeout 300 "$NCU" --clock-control none --profile-from-start off --metrics gpu__time_duration.sum \
    --print-summary per-kernel --csv /tmp/sdgen-bench --family "$MODEL" --model-dir "$DIR" --device cuda --dtype bf16 \
    --width 1024 --height 1024 --component transformer --iterations 1 --warmup 1 ${EXTRA:-} > "$D/ncu.csv" 2> "$D/ncu.log"
  python3 tools/gpu/ncu_summary.py "$D/ncu.csv" "$MODEL transformer (ours)" | tee "$D/ncu.txt"
fi
