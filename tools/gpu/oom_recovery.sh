#!/usr/bin/env bash
# A real out-of-memory recovery on the GPU: a ballast allocation (another process) leaves about
# 5 GB free, and `generate` is told it may use the whole card (--max-memory), so the planner
# chooses the fast plan and the UNet and the VAE decode at 768² really run out of memory; the
# stages must be retried leaner and the image still produced, the metadata recording it.
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
unpack generate
M=${1:-/tmp/bench-sd15-bf16}
if [ ! -f "$M/unet/diffusion_pytorch_model.safetensors" ]; then  # write the random-weight model
  unpack sdgen-bench
  /tmp/sdgen-bench --model-dir "$M" --device cuda --dtype bf16 --width 64 --height 64 --steps 1 > /dev/null
fi
python3 - <<'PY' &
import time, torch
free, total = torch.cuda.mem_get_info()
ballast = torch.empty(free - 5 * 2**30, dtype=torch.uint8, device="cuda")
print(f"ballast {ballast.numel() / 2**30:.1f} GiB, free now {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB", flush=True)
time.sleep(240)
PY
sleep 25
/tmp/generate "a lighthouse at dusk" --model "$M" --device cuda --dtype bf16 --width 768 --height 768 --steps 4 \
  --max-memory 79GB --output "$OUT/oom" --json > "$OUT/oom.json" 2> "$OUT/oom.log"
echo "generate exit $?"; grep -E "WARNING|Verdict|error" "$OUT/oom.log"; cat "$OUT/oom.json"
python3 -c "import json,glob; m=json.load(open(glob.glob('$OUT/oom/*.json')[0])); print('failures', m['failures']); print('optimizations', m['memory_optimizations'])"
kill %1 2>/dev/null
