"""Checks whether the torch on this machine draws the same CPU noise as the torch that made
testdata/reference/randn.json (the values sdgen's generator reproduces). Run on the GPU machine,
whose torch is older than the reference venv's: diffusers there draws its initial latents with it.
Prints one line per dtype: cases equal / cases in all."""
import json
import os
import struct
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
ref = json.load(open(os.path.join(here, "../../testdata/reference/randn.json")))
fmt = {"float32": ("<f", 4), "float64": ("<d", 8), "float16": ("<e", 2), "bfloat16": (None, 2)}


def bits(t):
    if t.dtype == torch.bfloat16:
        return [format(v & 0xFFFF, "04x") for v in t.view(torch.int16).tolist()]
    if t.dtype == torch.float16:
        return [format(v & 0xFFFF, "04x") for v in t.view(torch.int16).tolist()]
    if t.dtype == torch.float32:
        return [format(v & 0xFFFFFFFF, "08x") for v in t.view(torch.int32).tolist()]
    return [format(v & 0xFFFFFFFFFFFFFFFF, "016x") for v in t.view(torch.int64).tolist()]


print("torch", torch.__version__, "capability", torch.backends.cpu.get_cpu_capability(), "reference", ref["torch_version"])
stats = {}
for case in ref["avx2"]["cases"]:
    dt = getattr(torch, case["dtype"])
    g = torch.Generator("cpu").manual_seed(case["seed"])
    got = bits(torch.randn(case["numel"], dtype=dt, generator=g))
    want = case.get("values") or case["head"] + case["tail"]
    if "values" not in case:
        got = got[: len(case["head"])] + got[-len(case["tail"]):]
    ok = got == want
    s = stats.setdefault(case["dtype"], [0, 0])
    s[0] += ok
    s[1] += 1
for k, (ok, n) in stats.items():
    print(f"{k}: {ok}/{n} cases equal to the reference")
sys.exit(0)
