"""The markdown tables of tools/cpu/bench_cpu.sh from the JSON files it wrote into OUT: SD 1.5's
UNet evaluation and VAE decode, ours vs diffusers (f32, bf16), then each op of the kernel seam
vs PyTorch's, with the load average each was measured under.
Usage: python3 bench_table.py OUT"""
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
read = lambda name: json.loads((out / f"{name}.json").read_text())
load = lambda name: (out / f"{name}.load").read_text().strip() if (out / f"{name}.load").exists() else "?"
peer = read("peer_cpu")
print("| work (SD 1.5, 512²) | ours | diffusers / torch " + peer["torch"] + " | ours ÷ torch | load (ours; torch) |")
print("|---|---|---|---|---|")
for component, label in [("unet", "UNet evaluation, CFG batch 2"), ("vae", "VAE decode")]:
    for dt in ["f32", "bf16"]:
        ours = read(f"{component}_{dt}")["result"]["timed"]["eval"]["median_ms"] / 1e3
        key = f"unet_eval_512_b2_{dt}_ms" if component == "unet" else f"vae_decode_512_{dt}_ms"
        theirs = statistics.median(peer[key]) / 1e3 if key in peer else None
        ratio = f"{ours / theirs:.2f}×" if theirs else "—"
        theirs_s = f"{theirs:.2f} s" if theirs else "—"
        print(f"| {label}, {dt} | {ours:.2f} s | {theirs_s} | {ratio} | {load(f'{component}_{dt}')}; {load('peer_cpu')} |")
print()
peer_ops = read("peer_ops")
print("| op | dtype | ours ms (GFLOP/s) | torch ms (GFLOP/s) | ours ÷ torch |")
print("|---|---|---|---|---|")
for dt in ["f32", "bf16"]:
    theirs = {row["op"]: row for row in peer_ops[dt]}
    for row in read(f"ops_{dt}")["result"]["ops"]:
        t = theirs.get(row["op"])
        ratio = f"{row['median_ms'] / t['median_ms']:.2f}×" if t else "—"
        t_s = f"{t['median_ms']:.1f} ({t['gflops']:.0f})" if t else "—"
        print(f"| {row['op']} | {dt} | {row['median_ms']:.1f} ({row['gflops']:.0f}) | {t_s} | {ratio} |")
print(f"\nload average: ours f32 ops {load('ops_f32')}, bf16 ops {load('ops_bf16')}, torch ops {load('peer_ops')}")
