#!/usr/bin/env bash
# Whole images, warm and loads excluded, ours beside diffusers in one call on one card (the CUDA
# speed issue's "SD 1.5 whole 512² image, 20 steps" and "SDXL whole 30-step 1024² image,
# encoders + denoise + decode"): diffusers' pipelines time their second call (prompt encoding
# included) on folders they wrote (tools/gpu/{sd15,sdxl}_fullsize.py make), then `sdgen-bench`
# runs the same folders whole (speed.sh's `pipeline` part: load times apart). bf16; FAMILIES
# (default "sd15 sdxl") narrows. Expects .carry/sdgen-bench.xz, .carry/peer_diffusers.py and .whl/.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/whole"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
pipelines=()
for fam in ${FAMILIES:-sd15 sdxl}; do
  S=$SECONDS
  case $fam in
    sd15) M=/tmp/sd15-full
      [ -f $M/model_index.json ] || python3 tools/gpu/sd15_fullsize.py make $M > "$OUT/whole/make_sd15.log" 2>&1
      cp testdata/clip-tokenizer/{vocab.json,merges.txt,special_tokens_map.json} $M/tokenizer/
      OUT="$OUT/whole" python3 tools/gpu/sd15_fullsize.py diffusers $M 2>&1 | tail -1
      pipelines+=("sd15:512:20:$M");;
    sdxl) M=/tmp/sdxl-full
      [ -f $M/model_index.json ] || python3 tools/gpu/sdxl_fullsize.py make $M > "$OUT/whole/make_sdxl.log" 2>&1
      OUT="$OUT/whole" python3 tools/gpu/sdxl_fullsize.py diffusers $M 2>&1 | tail -1
      pipelines+=("sdxl:1024:30:$M");;
  esac
  echo "  diffusers $fam ($((SECONDS - S)) s)"
done
rm -f "$OUT"/whole/*.npy
PARTS=pipeline BENCH_KINDS=fast PIPELINES="${pipelines[*]}" OUT="$OUT/whole" bash "$(dirname "$0")/speed.sh" | grep -E "fast:"
