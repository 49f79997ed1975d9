"""Compares two 8-bit RGB PNGs with the project's image tolerance (at least 99.5% of channel
values within 1/255 and none over 8/255); prints the figures and exits 1 when outside it."""
import json
import sys

import numpy as np
from PIL import Image

a = np.asarray(Image.open(sys.argv[1]).convert("RGB")).astype(np.int32)
b = np.asarray(Image.open(sys.argv[2]).convert("RGB")).astype(np.int32)
d = np.abs(a - b)
res = {"a": sys.argv[1], "b": sys.argv[2], "within_1_pct": round(float((d <= 1).mean() * 100), 3), "max": int(d.max()),
       "mean": round(float(d.mean()), 4)}
res["pass"] = res["within_1_pct"] >= 99.5 and res["max"] <= 8
print(json.dumps(res))
sys.exit(0 if res["pass"] else 1)
