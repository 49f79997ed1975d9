"""sdgen-bench JSON files -> one line per stage and run: what ran (the planner's activation inputs),
the measured activation peak (the stage's device-wide peak less the run's floor -- the least
device memory in use at any stage boundary of the run: the CUDA context, other processes -- and
less its weights) and the planner's estimate. Usage: peaks_to_jsonl.py DIR > peaks.jsonl"""
import glob
import json
import os
import sys

STAGE = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "denoise",
         "refiner_text_encoder_2": "text_encoder_2",
         "refiner_unet": "denoise", "vae": "decode", "vae_encoder": "encode_image"}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    try:
        r = json.load(open(path))
    except Exception as e:  # a failed run leaves an empty file
        print(f"{os.path.basename(path)}: no result ({e})", file=sys.stderr)
        continue
    est = {s["stage"]: s for s in r["plan_estimate"]["stages"]}
    opts = r.get("options") or {}
    run = r["runs"][0]
    floor = min(min(m["before"]["gpu"]["used_bytes"], m["after"]["gpu"]["used_bytes"]) for m in run["memory"])
    for m in run["memory"]:
        stage = STAGE.get(m["label"])
        if stage is None or m.get("peak_gpu_bytes") is None:
            continue
        e = est.get(stage)
        if e is None:
            continue
        n = r["n"]
        items = {"text_encoder": 1, "text_encoder_2": 1, "refiner_text_encoder_2": 1, "denoise": 2 * n,
                 "decode": 1 if opts.get("vae_slicing") else n, "encode_image": 1}[stage]
        line = {
            "run": os.path.basename(path)[:-5],
            "stage": stage,
            "dtype": r["dtype"],
            "width": r["width"],
            "height": r["height"],
            "items": items,
            "images": n,
            "attention_slice_rows": opts.get("attention_slice") if stage == "denoise" else None,
            "vae_tile_px": opts.get("vae_tile_px") if stage == "decode" else None,
            "weight_bytes": e["weight_bytes"],
            "activation_bytes": m["peak_gpu_bytes"] - floor - e["weight_bytes"],
            "floor_bytes": floor,
            "estimate_activation_bytes": e["activation_bytes"],
            "elapsed_ms": m["elapsed_ms"],
        }
        print(json.dumps(line))
