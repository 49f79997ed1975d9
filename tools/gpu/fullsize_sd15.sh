#!/usr/bin/env bash
# Full-size SD 1.5 parity on the GPU machine (random weights at the real sizes, bf16 files):
# diffusers (carried wheel) and our CUDA binary generate the same prompt and seed; the script
# compares the images and records both runs' time and memory. Expects .whl/ (diffusers wheel)
# and .carry/generate.xz; writes into $OUT.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
unpack generate
M=/tmp/sd15-full
python3 tools/gpu/sd15_fullsize.py make $M 2>&1 | tail -3
# transformers 5 saves only tokenizer.json; the hub's SD 1.5 folder has the slow files too.
cp testdata/clip-tokenizer/{vocab.json,merges.txt,special_tokens_map.json} $M/tokenizer/
python3 tools/gpu/sd15_fullsize.py diffusers $M 2>&1 | tail -3
T=""; [ -x /usr/bin/time ] && T="/usr/bin/time -v"
# diffusers draws half-precision noise as this machine's torch does; tell ours which torch that is.
export SDGEN_TORCH_NOISE=$(python3 -c "import torch; print(torch.__version__)")
for dt in f32 bf16; do
  $T /tmp/generate "a lighthouse at dusk" --model $M --seed 42 --steps 20 --width 512 --height 512 \
    --device cuda --dtype $dt --output "$OUT/ours-$dt" --json > "$OUT/ours-$dt.json" 2> "$OUT/ours-$dt.log"
  echo "ours $dt exit $?"; cat "$OUT/ours-$dt.json"; grep -E "Maximum resident|Elapsed" "$OUT/ours-$dt.log"
done
python3 tools/gpu/sd15_fullsize.py compare
(cd "$OUT" && tar czf fullsize.tgz ours-f32 ours-bf16 ours-*.log diffusers-*.npy && rm -rf ours-f32 ours-bf16 diffusers-*.npy)
