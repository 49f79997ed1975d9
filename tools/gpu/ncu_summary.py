"""Summarises `ncu --print-summary per-kernel --csv --metrics gpu__time_duration.sum` output: the
kernels of one evaluation by total GPU time, their launch counts, and the total.
Usage: python3 ncu_summary.py FILE.csv LABEL"""
import csv, sys

path, label = sys.argv[1], sys.argv[2]
rows = []
with open(path, newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    try:
        count = int(r.get("Invocations") or r.get("ID") or 1)
        avg = float(r["Average"].replace(",", ""))
    except (KeyError, ValueError):
        continue
    unit = r.get("Metric Unit", "nsecond")
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, 1e-6)
    rows.append((r.get("Kernel Name", "?"), count, avg * count * scale))
rows.sort(key=lambda r: -r[2])
total = sum(r[2] for r in rows)
launches = sum(r[1] for r in rows)
print(f"== {label}: {launches} kernel launches, {total:.1f} ms GPU time (sum of kernel durations)")
for name, count, ms in rows[:25]:
    print(f"  {ms:8.2f} ms {100 * ms / max(total, 1e-9):5.1f}%  x{count:<5} {name[:110]}")
