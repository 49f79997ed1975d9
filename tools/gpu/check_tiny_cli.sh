#!/usr/bin/env bash
# The tiny SD 1.5 model through the CUDA `generate` binary (f32 and bf16), compared with
# diffusers' CPU reference image for the same seed. Expects .carry/generate.xz; writes $OUT.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
unpack generate
for dt in f32 bf16; do
  /tmp/generate "a lighthouse at dusk" --model testdata/tiny-sd15 --seed 42 --steps 10 --device cuda --dtype $dt \
    --output "$OUT/tiny-$dt" --json > "$OUT/tiny-$dt.json" 2> "$OUT/tiny-$dt.log"; echo "tiny $dt exit $?"
  python3 tools/gpu/compare_png.py "$OUT"/tiny-$dt/*.png testdata/reference/sd15/png/pndm_basic_0.png | tee -a "$OUT/tiny_compare.jsonl"
done
python3 tools/gpu/torch_randn_check.py 2>&1 | tee "$OUT/torch_randn.log"
