"""One line per sdgen-bench whole-run JSON (tools/gpu/low_memory_loads_apart.sh): the budget, the
plan's streaming and host placements, loads apart from compute, the evaluations' median and sum and
the time after a denoising stage's last step (its teardown), per-stage peaks (device-wide, allocated)."""
import json
import sys

for path in sys.argv[1:]:
    try:
        d = json.load(open(path))
    except Exception as e:
        print(f"{path}: no result ({e})"); continue
    r = d["runs"][-1]; c = r["clock"]; loads = c["load_ms"]; t = r["timings_ms"]
    compute = {k: round(v - loads.get(k, 0.0)) for k, v in t.items()}
    den = [k for k in compute if k in ("transformer", "unet")]
    dd = sum(compute[k] for k in den) + compute.get("vae", 0)
    mem = {m.get("stage") or m.get("label"): (round((m.get("peak_gpu_bytes") or 0) / 1e9, 2),
                                              round((m.get("peak_gpu_allocated_bytes") or 0) / 1e9, 2)) for m in r["memory"]}
    first = r["memory"][0]["before"].get("gpu") if r["memory"] else None
    floor = round(first["used_bytes"] / 1e9, 2) if first else None
    bp = d.get("budget_plan") or {}
    stream = [(s["stage"], s["options"].get("streaming"), s["options"].get("on_host")) for s in bp.get("stages", [])
              if s["options"].get("streaming") or s["options"].get("on_host")]
    print(f"{path}: budget {d.get('max_memory')}, {d['steps']} steps; denoise+decode compute {dd / 1e3:.2f} s "
          f"(eval median {c['evaluation_median_ms']:.1f} ms, sum {c.get('evaluations_sum_ms', 0) / 1e3:.2f} s, "
          f"after the last step ms {({k: round(v) for k, v in c.get('after_steps_ms', {}).items()})}); loads {sum(loads.values()) / 1e3:.1f} s; "
          f"compute per stage ms {compute}; peaks GB (device-wide incl. floor {floor}, allocated) {mem}; plan {stream}")
