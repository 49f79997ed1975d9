#!/usr/bin/env bash
# One full-size SD 3.5 MMDiT forward, ours against diffusers' on the same inputs, f32 and bf16
# (tools/gpu/sd35_forward.py), on the folder sd35_fullsize.sh made (DIR, default
# /tmp/sd35-large-full). Expects /tmp/sdgen-bench (or .carry/sdgen-bench.xz) and .whl/; writes
# $OUT/forward/ and prints the comparison.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; F="$OUT/forward"; mkdir -p "$F"
DIR=${DIR:-/tmp/sd35-large-full}
unpack sdgen-bench
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT="$F" python3 tools/gpu/sd35_forward.py inputs "$DIR" || exit 1
OUT="$F" python3 tools/gpu/sd35_forward.py reference "$DIR" > "$F/reference.log" 2>&1; tail -1 "$F/reference.log"
for dt in f32 bf16; do
  /tmp/sdgen-bench --family sd35-large --model-dir "$DIR" --device cuda --dtype $dt --width 1024 --height 1024 \
    --component transformer --iterations 1 --warmup 0 --inputs "$F/inputs.safetensors" --dump "$F/ours-$dt.safetensors" \
    > "$F/ours-$dt.json" 2> "$F/ours-$dt.log"; echo "ours $dt exit $?"
done
OUT="$F" python3 tools/gpu/sd35_forward.py compare
rm -f "$F/inputs.safetensors"
