#!/usr/bin/env bash
# Full-size SDXL base parity on the GPU machine (random weights at the real sizes, bf16 files in
# the hub's layout): diffusers (carried wheel) and our CUDA binary generate the same prompt and
# seed at 1024², 30 steps, guidance 5; the script compares the images and records both runs' time
# and memory. Expects .whl/ (diffusers wheel) and .carry/generate.xz (carry both); writes into
# $OUT: sdxl_fullsize.json (diffusers', ours, the comparison) and fullsize_sdxl.tgz (images, logs).
# DTYPES="f32 bf16" adds an f32 run on both sides (about a minute more).
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export DTYPES=${DTYPES:-bf16}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
unpack generate
M=/tmp/sdxl-full
S=$SECONDS
# Made once per machine (a warm machine's rerun keeps it: writing 7 GB takes a while).
if [ -f $M/.made ]; then echo "reusing $M" > "$OUT/make.log"; else
  python3 tools/gpu/sdxl_fullsize.py make $M > "$OUT/make.log" 2>&1; echo "make exit $? ($((SECONDS - S)) s)"
fi; tail -2 "$OUT/make.log"
du -sh $M/* 2>/dev/null | tr '\n' ' '; echo
S=$SECONDS
python3 tools/gpu/sdxl_fullsize.py diffusers $M > "$OUT/diffusers.log" 2>&1; echo "diffusers exit $? ($((SECONDS - S)) s)"; tail -2 "$OUT/diffusers.log"
T=""; [ -x /usr/bin/time ] && T="/usr/bin/time -v"
# diffusers draws half-precision noise as this machine's torch does; tell ours which torch that is.
export SDGEN_TORCH_NOISE=$(python3 -c "import torch; print(torch.__version__)")
for dt in $DTYPES; do
  S=$SECONDS
  $T /tmp/generate "a lighthouse at dusk" --model $M --seed 42 --steps 30 --guidance 5 --width 1024 --height 1024 \
    --device cuda --dtype $dt --output "$OUT/ours-$dt" --json > "$OUT/ours-$dt.json" 2> "$OUT/ours-$dt.log"
  echo "ours $dt exit $? ($((SECONDS - S)) s)"; cat "$OUT/ours-$dt.json"; echo
  grep -E "Maximum resident|Elapsed" "$OUT/ours-$dt.log"; grep -iE "error|panic" "$OUT/ours-$dt.log" | head -5
done
python3 tools/gpu/sdxl_fullsize.py compare
# One archive: PNGs (ours and diffusers' rounded), logs, per-run JSON; the f32 arrays stay behind.
(cd "$OUT" && files=() && for f in ours-* diffusers-*.png diffusers.json make.log diffusers.log; do
  [ -e "$f" ] && files+=("$f"); done; tar czf fullsize_sdxl.tgz "${files[@]}" && rm -rf "${files[@]}" diffusers-*.npy)
ls -la "$OUT"
