#!/usr/bin/env bash
# The foundation's CUDA check, run on the GPU machine from the repository root (see README):
# the tiny-model pipelines on CUDA against diffusers' references and our CPU run, the CLI end to
# end on CUDA, and whether the machine's torch draws the same noise as the reference torch.
# Expects .carry/generate.xz and .carry/gpu_parity.xz (built here with --features cuda).
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for b in generate gpu_parity; do xz -dc ".carry/$b.xz" > "/tmp/$b" && chmod +x "/tmp/$b"; done
SDGEN_TESTDATA=$PWD/testdata /tmp/gpu_parity --nocapture --test-threads=1 2>&1 | tee "$OUT/gpu_parity.log"
for dt in f32 bf16; do
  /tmp/generate "a lighthouse at dusk" --model testdata/tiny-sd15 --seed 42 --steps 10 --device cuda --dtype $dt \
    --output "$OUT/cli-$dt" --json > "$OUT/cli-$dt.json" 2> "$OUT/cli-$dt.log"; echo "cli $dt exit $?"
  cat "$OUT/cli-$dt.json"
done
python3 tools/gpu/torch_randn_check.py 2>&1 | tee "$OUT/torch_randn.log"
(cd "$OUT" && tar czf cli-outputs.tgz cli-f32 cli-bf16 && rm -rf cli-f32 cli-bf16)
