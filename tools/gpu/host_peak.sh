#!/usr/bin/env bash
# Host memory while the weights go to the GPU: the process's peak RSS for a whole bf16 run of
# full-size SD 1.5, beside the peak of `--check` in the same setting (CUDA runtime and model
# headers, no weights): the difference is what loading costs on the host, to compare with the
# UNet file's size (target: under 0.25x). Expects .carry/{generate,sdgen-bench}.xz; writes $OUT.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
unpack generate sdgen-bench
M=/tmp/bench-sd15-bf16
[ -f $M/unet/diffusion_pytorch_model.safetensors ] || /tmp/sdgen-bench --model-dir $M --device cuda --dtype bf16 --width 64 --height 64 --steps 1 > /dev/null
rss() { /usr/bin/time -v "$@" 2>&1 >/dev/null | awk '/Maximum resident/ {print $6}'; }
base=$(rss /tmp/generate --check --device cuda --model $M)
run=$(rss /tmp/generate "a lighthouse at dusk" --model $M --device cuda --dtype bf16 --steps 2 --output "$OUT/hp")
unet=$(stat -c %s $M/unet/diffusion_pytorch_model.safetensors)
python3 -c "b,r,u=$base,$run,$unet; print(f'check peak {b/1024:.0f} MB, run peak {r/1024:.0f} MB, loading cost {(r-b)/1024:.0f} MB = {(r-b)*1024/u:.3f}x the {u/2**20:.0f} MB UNet file')" | tee "$OUT/host_peak.txt"
