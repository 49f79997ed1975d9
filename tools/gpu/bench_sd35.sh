#!/usr/bin/env bash
# SD 3.5 Large (or MODEL=sd35-medium) at full size (random weights) through sdgen-bench on the GPU,
# and the peer (diffusers, .carry/peer_diffusers.py part `sd35`: the Large MMDiT step at 1024²
# batch 2 and its VAE decode) in the same call on the same card. bf16, 1024², STEPS (default 10)
# steps with CFG. Expects .carry/sdgen-bench.xz, .carry/peer_diffusers.py and .whl/ (diffusers
# wheel); writes $OUT/bench_sd35/ (JSON, logs) and $OUT/bench_sd35_summary.txt.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
unpack sdgen-bench
B="$OUT/bench_sd35"; mkdir -p "$B"
MODEL=${MODEL:-sd35-large}
S=$SECONDS
/tmp/sdgen-bench --family "$MODEL" --model-dir "/tmp/bench-$MODEL-bf16" --device cuda --dtype bf16 \
  --width 1024 --height 1024 --steps "${STEPS:-10}" > "$B/bench_$MODEL.json" 2> "$B/bench_$MODEL.log"
echo "bench $MODEL exit $? ($((SECONDS - S)) s)"; tail -c 1500 "$B/bench_$MODEL.log"; echo
S=$SECONDS
mkdir -p "$B/peer"
OUT="$B/peer" python3 .carry/peer_diffusers.py ${PEER_PARTS:-sd35} > "$B/peer/peer.log" 2>&1
echo "peer exit $? ($((SECONDS - S)) s)"; cat "$B/peer/peer.log" | tail -20
python3 - "$B" "$MODEL" <<'PY' | tee "$OUT/bench_sd35_summary.txt"
import json, sys
d, model = sys.argv[1], sys.argv[2]
r = json.load(open(f"{d}/bench_{model}.json"))
print(json.dumps({k: v for k, v in r.items() if k not in ("memory",)}, indent=1)[:6000])
PY
