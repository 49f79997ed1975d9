#!/usr/bin/env bash
# SDXL base and refiner at full size (random weights) through sdgen-bench on the GPU, and the peer
# figures (diffusers, .carry/peer_diffusers.py) in the same call on the same card: per-stage time
# and measured peaks beside the planner's estimates. All bf16, 1024², 30 steps:
#   sdxl          base text-to-image;
#   sdxl-refiner  the refiner alone, image-to-image of a synthetic picture at strength 0.3 (9 run);
#   sdxl-refined  base then refiner as `generate --refiner` runs them (handoff at 0.8: 24 + 6).
# Peer: `sdxl` (UNet step at 1024² batch 2, VAE decode) and `sdxl_modes` with MODES=none (the whole
# 30-step denoise + decode, encoders left out). Expects .carry/sdgen-bench.xz,
# .carry/peer_diffusers.py and .whl/ (diffusers wheel; carry both); writes into $OUT:
# bench_sdxl_summary.txt and bench_sdxl.tgz (every JSON and log, peaks.jsonl).
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
unpack sdgen-bench
B="$OUT/bench_sdxl"; mkdir -p "$B"
# The folders are written by the first two runs (about 7 and 6 GB) and reused by the third.
# BENCH_RUNS picks runs (default all three); BASE_DIR reuses a base folder already written (e.g.
# sdxl_fullsize.sh's /tmp/sdxl-full); PEER_PARTS the peer's parts (default "sdxl sdxl_modes").
BASE_DIR=${BASE_DIR:-/tmp/bench-sdxl-bf16}
declare -A RUN=([sdxl]="sdxl sdxl" [sdxl-refiner]="sdxl-refiner sdxl-refiner" [sdxl-refined]="sdxl-refined sdxl --refiner")
for key in ${BENCH_RUNS:-sdxl sdxl-refiner sdxl-refined}; do
  set -- ${RUN[$key]}; name=$1; shift
  dir=/tmp/bench-$1-bf16; [ "$1" = sdxl ] && dir=$BASE_DIR
  S=$SECONDS
  /tmp/sdgen-bench --family "$@" --model-dir "$dir" --refiner-dir /tmp/bench-sdxl-refiner-bf16 \
    --device cuda --dtype bf16 --width 1024 --height 1024 --steps 30 > "$B/bench_${name}_1024.json" 2> "$B/bench_${name}_1024.log"
  echo "bench $name 1024² exit $? ($((SECONDS - S)) s)"; tail -c 400 "$B/bench_${name}_1024.log"; echo
done
python3 tools/gpu/peaks_to_jsonl.py "$B" > "$B/peaks.jsonl"
S=$SECONDS
mkdir -p "$B/peer"
OUT="$B/peer" MODES=none STEPS=30 python3 .carry/peer_diffusers.py ${PEER_PARTS:-sdxl sdxl_modes} > "$B/peer/peer.log" 2>&1
echo "peer exit $? ($((SECONDS - S)) s)"
python3 - "$B" <<'EOF' | tee "$OUT/bench_sdxl_summary.txt"
"""Per stage: time, the measured GPU peak (device-wide), the peak above the run's floor (the least
in use at any stage boundary: CUDA context, other processes) and the planner's estimate beside it;
then our figures against the peer's from the same call."""
import glob, json, os, sys
d = sys.argv[1]
GB = 2 ** 30
# Engine stage labels -> planner stages (a label that is itself a planner stage maps to itself).
# (`refiner_unet`, the refiner's half of a --refiner run, has no estimate: the plan is the base's.)
STAGE = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "vae_encoder": "encode_image",
         "unet": "denoise", "vae": "decode"}
ours = {}
for path in sorted(glob.glob(os.path.join(d, "bench_*.json"))):
    name = os.path.basename(path)
    try:
        r = json.load(open(path))
    except Exception as e:  # a failed run leaves an empty file
        print(name, "no result:", e)
        continue
    plan = r.get("plan_estimate") or {}
    est = {s["stage"]: s for s in plan.get("stages", [])}
    run = r["runs"][0]
    ours[name] = run
    print(f"{name}: {r['family']} {r['width']}x{r['height']} n={r['n']} {r['dtype']} steps={r['steps']} "
          f"({run.get('denoising_steps')} denoised) total {run['total_ms'] / 1e3:.2f}s, "
          f"denoise {run['denoise_ms_per_step']:.1f} ms/step, weights "
          f"{sum(r['weights_bytes'].values()) / GB:.2f} GB, warm-up {r['warmup_ms'] / 1e3:.1f}s")
    if run.get("refinement"):
        print(f"  refiner: {run['refinement']}, {run['refiner_denoise_ms_per_step']:.1f} ms/step")
    if plan.get("error"):
        print("  no planner estimate:", plan["error"][:300])
    mem = run["memory"]
    floor = min(min(m["before"]["gpu"]["used_bytes"], m["after"]["gpu"]["used_bytes"]) for m in mem)
    for m in mem:
        stage = STAGE.get(m["label"], m["label"])
        e = est.get(stage)
        peak = m.get("peak_gpu_bytes") or 0
        above = peak - floor
        line = f"  {m['label']:<15} {m['elapsed_ms'] / 1e3:7.2f}s  peak {peak / GB:6.2f} GB (above floor {above / GB:6.2f})"
        if e:
            act = above - e["weight_bytes"]
            line += (f"  est {e['peak_bytes'] / GB:6.2f} GB (w {e['weight_bytes'] / GB:.2f} + act "
                     f"{e['activation_bytes'] / GB:.2f}; measured act {act / GB:.2f})  est/measured "
                     f"{e['peak_bytes'] / max(above, 1):.2f}")
        print(line)
try:
    peer = json.load(open(os.path.join(d, "peer", "peer_diffusers.json")))
except Exception as e:
    peer = {}
    print("peer: no result:", e)
if peer:
    print("peer (diffusers, same card):", json.dumps(peer))
base = ours.get("bench_sdxl_1024.json")
if base and peer:
    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"
    unet_ms = base["denoise_ms_per_step"]
    peer_unet = (peer.get("sdxl_unet_step_1024_b2_ms") or [None])[0]
    print(f"denoise step (b2, 1024²): ours {unet_ms:.1f} ms, diffusers {peer_unet} ms -> {ratio(unet_ms, peer_unet)}")
    vae_ms = base["timings_ms"].get("vae")
    peer_vae = (peer.get("sdxl_vae_decode_1024_ms") or [None])[0]
    print(f"VAE decode 1024² (ours: stage incl. load): ours {vae_ms or 0:.1f} ms, diffusers {peer_vae} ms -> "
          f"{ratio(vae_ms, peer_vae)}")
    whole = sum(base["timings_ms"].get(k, 0) for k in ("unet", "vae"))
    peer_whole = peer.get("sdxl_modes_none_30steps_s")
    print(f"30 steps + decode (ours: denoise + decode stages, loads incl.): ours {whole / 1e3:.2f}s, diffusers "
          f"{peer_whole}s (peak {peer.get('sdxl_modes_none_peak_GB')} GB) -> {ratio(whole / 1e3, peer_whole)}")
EOF
(cd "$OUT" && tar czf bench_sdxl.tgz bench_sdxl && rm -rf bench_sdxl)
ls -la "$OUT"
