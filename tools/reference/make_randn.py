#!/usr/bin/env python3
"""Write testdata/reference/randn.json: what torch's CPU generator gives for `torch.randn`.

The Rust port in crates/sdgen/src/rng.rs is checked against this file bit for bit.

    /opt/refvenv/bin/python tools/reference/make_randn.py

Each case is `torch.randn(numel, generator=torch.Generator("cpu").manual_seed(seed), dtype=D)`.
Values are stored as the hex bit patterns of the native dtype (4 hex digits for float16/bfloat16,
8 for float32, 16 for float64) because JSON float parsing (serde_json's default included) is not
guaranteed to round-trip float64 exactly. Cases with numel <= 80 are stored whole; longer ones keep
the first 64 and last 16 values (the last 16 are the re-drawn tail block of `normal_fill`) plus
the float64 sum of all values.

torch's float32/float16/bfloat16 Box-Muller for numel >= 16 depends on the CPU capability ATen
dispatches to: AVX2 and AVX512 builds use the Cephes polynomials of avx_mathfun.h, the DEFAULT
build uses libm's logf/cosf/sinf. The main cases run under AVX2 (forced through
ATEN_CPU_CAPABILITY so the file does not depend on this machine); a smaller "scalar" set runs
under ATEN_CPU_CAPABILITY=default in a child process.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

SEEDS = [0, 1, 42, 12345, 2**32 + 7, 2**63 - 1]
NUMELS = [1, 2, 5, 15, 16, 17, 31, 256, 1000, 16384]
DTYPES = ["float32", "float16", "bfloat16", "float64"]
SCALAR_SEEDS = [0, 42]
SCALAR_NUMELS = [16, 17, 1000]
HEAD, TAIL = 64, 16
# One generator, several draws: checks the stream continues and the cached normal sample.
SEQUENCES = [
    [(256, "float32"), (3, "float32"), (17, "float32")],
    [(3, "float32"), (3, "float32"), (16, "float16"), (1, "float64"), (17, "bfloat16"),
     (2, "float32"), (33, "float64"), (5, "bfloat16")],
]
SEQUENCE_SEED = 42
OUT = Path(__file__).resolve().parents[2] / "testdata" / "reference" / "randn.json"


def hex_bits(t):
    """Bit patterns of a 1-D tensor's values in its own dtype, as fixed-width hex strings."""
    import torch

    if t.dtype == torch.float64:
        return [f"{struct.unpack('<Q', struct.pack('<d', v))[0]:016x}" for v in t.tolist()]
    if t.dtype == torch.float32:
        return [f"{struct.unpack('<I', struct.pack('<f', v))[0]:08x}" for v in t.tolist()]
    # float16 / bfloat16: reinterpret as int16, print as unsigned.
    return [f"{v & 0xFFFF:04x}" for v in t.view(torch.int16).tolist()]


def describe(t):
    """The stored summary of one randn result."""
    import torch

    n = t.numel()
    entry = {"numel": n, "dtype": str(t.dtype).removeprefix("torch."),
             "sum": float(t.to(torch.float64).sum())}
    if n <= HEAD + TAIL:
        entry["values"] = hex_bits(t)
    else:
        entry["head"] = hex_bits(t[:HEAD])
        entry["tail"] = hex_bits(t[-TAIL:])
    return entry


def run_cases(seeds, numels, dtypes):
    import torch

    cases = []
    for seed in seeds:
        for dtype in dtypes:
            for n in numels:
                g = torch.Generator("cpu").manual_seed(seed)
                t = torch.randn(n, generator=g, dtype=getattr(torch, dtype))
                cases.append({"seed": seed, **describe(t)})
    return cases


def child(capability):
    """Runs in a subprocess with ATEN_CPU_CAPABILITY set; prints its cases as JSON."""
    import torch

    got = torch.backends.cpu.get_cpu_capability()
    if got.lower() != capability.lower():
        sys.exit(f"asked for ATEN_CPU_CAPABILITY={capability}, torch dispatches to {got}")
    if capability == "default":
        cases = run_cases(SCALAR_SEEDS, SCALAR_NUMELS, ["float32", "float16", "bfloat16"])
    else:
        cases = run_cases(SEEDS, NUMELS, DTYPES)
    sequences = []
    for steps in SEQUENCES:
        g = torch.Generator("cpu").manual_seed(SEQUENCE_SEED)
        draws = [describe(torch.randn(n, generator=g, dtype=getattr(torch, dt)))
                 for n, dt in steps]
        sequences.append({"seed": SEQUENCE_SEED, "draws": draws})
    json.dump({"capability": got, "cases": cases, "sequences": sequences}, sys.stdout)


def run_child(capability):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, __file__, "--child", capability], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    import torch

    print(f"torch {torch.__version__}, native CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    vector = run_child("avx2")
    scalar = run_child("default")
    doc = {
        "generator": "torch.randn(numel, dtype=dtype,"
                     " generator=torch.Generator('cpu').manual_seed(seed))",
        "torch_version": torch.__version__,
        "encoding": "values/head/tail are hex bit patterns of the native dtype; sum is float64",
        "head": HEAD,
        "tail": TAIL,
        "avx2": vector,
        "scalar": {
            "note": "ATEN_CPU_CAPABILITY=default: Box-Muller through libm logf/cosf/sinf",
            **scalar,
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, "
          f"{len(vector['cases'])} avx2 cases, {len(scalar['cases'])} scalar cases)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
