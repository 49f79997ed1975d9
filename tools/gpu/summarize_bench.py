"""Summarises sdgen-bench JSON files: per stage, time and the measured GPU peak beside the
planner's estimate; and, for the leak run, GPU memory after each generation."""
import glob
import json
import os
import sys

out = sys.argv[1]
STAGE = {"text_encoder": "text_encoder", "unet": "denoise", "vae": "decode"}
GB = 2 ** 30
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        r = json.load(open(path))
    except Exception as e:  # a failed run leaves an empty file
        print(os.path.basename(path), "no result:", e)
        continue
    name = os.path.basename(path)
    est = {s["stage"]: s for s in r["plan_estimate"]["stages"]}
    if name == "bench_leak.json":
        used = [run["memory"][-1]["after"]["gpu"]["used_bytes"] for run in r["runs"]]
        print(f"leak: GPU used after each of {len(used)} generations (MB):", [round(u / 2**20) for u in used],
              f"max drift from the first {max(abs(u - used[0]) for u in used) / 2**20:.1f} MB")
        continue
    run = r["runs"][0]
    print(f"{name}: {r['width']}² n={r['n']} {r['dtype']} steps={r['steps']} total {run['total_ms'] / 1e3:.2f}s, "
          f"denoise {run['denoise_ms_per_step']:.1f} ms/step")
    base = run["memory"][0]["before"]["gpu"]["used_bytes"]
    for m in run["memory"]:
        e = est.get(STAGE.get(m["label"], ""), None)
        peak = m.get("peak_gpu_bytes") or 0
        above = peak - base
        line = f"  {m['label']:<13} {m['elapsed_ms'] / 1e3:7.2f}s  peak {peak / GB:6.2f} GB (above start {above / GB:6.2f} GB)"
        if e:
            line += f"  est {e['peak_bytes'] / GB:6.2f} GB (w {e['weight_bytes'] / GB:.2f} + act {e['activation_bytes'] / GB:.2f})"
            line += f"  est/measured {e['peak_bytes'] / max(above, 1):.2f}"
        print(line)
