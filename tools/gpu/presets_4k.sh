#!/usr/bin/env bash
# `generate --quality 4k` (1024² → ×2 → hires pass at 2048²) and `--quality 4k-ultra` (then ×2 →
# a second hires pass at 4096², both denoised in MultiDiffusion's 1024² tiles) with SDXL random
# weights at the real sizes on the GPU: the wall time of each whole run (the seed's claims:
# "4k: 21 seconds", "4k-ultra: 3 minutes"), every stage's time and measured GPU peak beside the
# planner's estimate for its pass, and whether each pass stayed within its planned budget.
# Expects $CARRY/generate.xz and $CARRY/sdgen-bench.xz (CUDA builds with cuDNN, see the session
# notes; CARRY defaults to .carry);
# writes $OUT/presets/{4k,4k-ultra}.{json,log} with the sidecars (PNGs deleted: the 4096² one of
# random weights is ~50 MB) and $OUT/presets_summary.txt.
# Env: DTYPE (bf16), STEPS (the model's 50 when unset), MODEL_DIR (/tmp/bench-sdxl-bf16, written
# by sdgen-bench --write-only when absent), PRESETS ("4k 4k-ultra"), MAX_MEMORY (none: the card).
set -uo pipefail
source "$(dirname "$0")/cuda_env.sh"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/presets"
CARRY=${CARRY:-.carry}
unpack generate sdgen-bench || exit 1
DTYPE=${DTYPE:-bf16}
M=${MODEL_DIR:-/tmp/bench-sdxl-$DTYPE}
if [ ! -f "$M/unet/diffusion_pytorch_model.safetensors" ]; then
  S=$SECONDS
  /tmp/sdgen-bench --family sdxl --model-dir "$M" --device cuda --dtype "$DTYPE" --write-only > "$OUT/presets/write.json" \
    2> "$OUT/presets/write.log" || { tail -20 "$OUT/presets/write.log"; exit 1; }
  echo "wrote $M ($((SECONDS - S)) s)"
fi
for q in ${PRESETS:-4k 4k-ultra}; do
  extra=()
  [ -n "${STEPS:-}" ] && extra+=(--steps "$STEPS")
  [ -n "${MAX_MEMORY:-}" ] && extra+=(--max-memory "$MAX_MEMORY")
  start=$(date +%s.%N)
  /tmp/generate "a lighthouse at dusk, highly detailed" --model "$M" --quality "$q" --device cuda --dtype "$DTYPE" \
    --seed 1 "${extra[@]}" --output "$OUT/presets/$q" --json > "$OUT/presets/$q.json" 2> "$OUT/presets/$q.log"
  rc=$?
  end=$(date +%s.%N)
  echo "{\"preset\": \"$q\", \"exit\": $rc, \"wall_s\": $(python3 -c "print(round($end - $start, 2))")}" > "$OUT/presets/$q.wall.json"
  echo "--quality $q: exit $rc, $(python3 -c "print(round($end - $start, 1))") s"; [ $rc -ne 0 ] && tail -c 1500 "$OUT/presets/$q.log"
  rm -f "$OUT/presets/$q"/*.png
done
python3 - "$OUT/presets" <<'PY' | tee "$OUT/presets_summary.txt"
"""Per preset: the wall time, then per stage its time, its measured GPU peak above the run's floor
(the least in use at any stage boundary: the CUDA context, which --max-memory does not count)
and the planner's estimate for the pass it belongs to (the first pass's plan, `hires_plan` or
`hires_plans[k]`), and whether every pass stayed within its plan's usable budget."""
import glob, json, os, sys
d = sys.argv[1]
GB = 2 ** 30
PLANNER = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "vae_encoder": "encode_image",
           "unet": "denoise", "vae": "decode"}
PREFIXES = ["hires2_", "hires_"]  # the second hires pass's stages first: "hires_" is a prefix of neither
for wall_path in sorted(glob.glob(os.path.join(d, "*.wall.json"))):
    wall = json.load(open(wall_path))
    q = wall["preset"]
    side = sorted(glob.glob(os.path.join(d, q, "*.json")))
    print(f"--quality {q}: exit {wall['exit']}, wall {wall['wall_s']:.1f} s")
    if not side:
        print("  no sidecar")
        continue
    meta = json.load(open(side[0]))
    extra = meta["extra"]
    plans = {"": extra["plan"]}
    hires = extra.get("hires_plans") or ([extra["hires_plan"]] if "hires_plan" in extra else [])
    for prefix, p in zip(["hires_", "hires2_"], hires):
        plans[prefix] = p
    for p in extra.get("passes", []):
        tiles = p.get("tiles")
        print(f"  pass {p['pass']:<8} {p['width']}x{p['height']}" + (f"  {tiles['count']} MultiDiffusion tiles of "
              f"{tiles['tile_px']} px, overlap {tiles['overlap_px']} px" if tiles else ""))
    mem = meta["extra"]["memory"]
    floor = min(min(m["before"]["gpu"]["used_bytes"], m["after"]["gpu"]["used_bytes"]) for m in mem)
    worst = {}
    for m in mem:
        label = m["label"]
        prefix = next((p for p in PREFIXES if label.startswith(p)), "")
        stage = PLANNER.get(label[len(prefix):])
        plan = plans.get(prefix)
        est = next((s for s in plan["stages"] if s["stage"] == stage), None) if plan and stage else None
        above = (m.get("peak_gpu_bytes") or 0) - floor
        worst[prefix] = max(worst.get(prefix, 0), above)
        line = f"  {label:<22} {m['elapsed_ms'] / 1e3:7.2f} s  peak {above / GB:6.2f} GB"
        if est:
            opts = ", ".join(filter(None, [json.dumps(est["options"]) if est["options"] else "",
                                           "tiles" if est.get("denoise_tiles") else ""]))
            line += f"  est {est['peak_bytes'] / GB:6.2f} GB  est/measured {est['peak_bytes'] / max(above, 1):.2f}  {opts}"
        print(line)
    for prefix, peak in worst.items():
        plan = plans.get(prefix)
        if plan:
            ok = "within" if peak <= plan["usable_bytes"] else "OVER"
            print(f"  pass {prefix or 'first'}: peak {peak / GB:.2f} GB, planned peak {plan['peak_bytes'] / GB:.2f} GB, "
                  f"usable {plan['usable_bytes'] / GB:.2f} GB: {ok} budget")
    print(f"  timings: " + ", ".join(f"{k} {v / 1e3:.1f}s" for k, v in meta["timings_ms"].items()))
PY
