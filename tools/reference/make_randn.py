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

Older torch draws float16/bfloat16 noise differently (see crates/sdgen/src/rng.rs): torch <= 2.11
computes Box-Muller in the half type itself, 2.12 in float through libm. With --torch-legacy, run
under such a torch, the script writes testdata/reference/randn_torch<MAJOR><MINOR>.json instead
(same encoding): float16/bfloat16 cases on every numel path, a few float32/float64 cases (which
did not change), and sequences. It checks that the float16/bfloat16 values are the same under the
AVX2, DEFAULT and native capabilities before writing, and records that.

    python3.11 -m venv /opt/torch211 && /opt/torch211/bin/pip install torch==2.11.0
    /opt/torch211/bin/python tools/reference/make_randn.py --torch-legacy
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
# --torch-legacy: every numel path of the half types, several seeds; float32/float64 spot checks.
LEGACY_SEEDS = [0, 1, 42, 12345, 2**32 + 7]
LEGACY_WIDE_SEEDS = [0, 42]
LEGACY_WIDE_NUMELS = [5, 17, 1000]
LEGACY_SEQUENCES = SEQUENCES + [
    # Non-multiples of 16 (the half types' draw count changed), the scalar path's cached sample
    # (3 scalar draws leave one behind for the 1), and float32 in between.
    [(17, "float16"), (33, "bfloat16"), (3, "float16"), (16, "bfloat16"), (40, "float32"),
     (1, "bfloat16"), (1000, "float16"), (31, "bfloat16")],
]


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


def child(capability, legacy=False):
    """Runs in a subprocess with ATEN_CPU_CAPABILITY set; prints its cases as JSON."""
    import torch

    got = torch.backends.cpu.get_cpu_capability()
    if capability != "native" and got.lower() != capability.lower():
        sys.exit(f"asked for ATEN_CPU_CAPABILITY={capability}, torch dispatches to {got}")
    if legacy:
        cases = (run_cases(LEGACY_SEEDS, NUMELS, ["float16", "bfloat16"])
                 + run_cases(LEGACY_WIDE_SEEDS, LEGACY_WIDE_NUMELS, ["float32", "float64"]))
    elif capability == "default":
        cases = run_cases(SCALAR_SEEDS, SCALAR_NUMELS, ["float32", "float16", "bfloat16"])
    else:
        cases = run_cases(SEEDS, NUMELS, DTYPES)
    sequences = []
    for steps in LEGACY_SEQUENCES if legacy else SEQUENCES:
        g = torch.Generator("cpu").manual_seed(SEQUENCE_SEED)
        draws = [describe(torch.randn(n, generator=g, dtype=getattr(torch, dt)))
                 for n, dt in steps]
        sequences.append({"seed": SEQUENCE_SEED, "draws": draws})
    json.dump({"capability": got, "cases": cases, "sequences": sequences}, sys.stdout)


def run_child(capability, legacy=False):
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    flag = "--child-legacy" if legacy else "--child"
    out = subprocess.run([sys.executable, __file__, flag, capability], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def half_only(result):
    """The float16/bfloat16 cases of a child's result (the capability-dependent rest dropped)."""
    return [c for c in result["cases"] if c["dtype"] in ("float16", "bfloat16")]


def main_legacy():
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if (major, minor) >= (2, 13):
        sys.exit(f"--torch-legacy needs torch <= 2.12, this is {torch.__version__}"
                 " (use /opt/torch211/bin/python)")
    print(f"torch {torch.__version__}, native CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    vector = run_child("avx2", legacy=True)
    same_under = [vector["capability"]]
    for other in ("default", "native"):
        result = run_child(other, legacy=True)
        if half_only(result) != half_only(vector):
            sys.exit(f"float16/bfloat16 noise differs between AVX2 and {result['capability']}:"
                     " the legacy reference would depend on the CPU")
        same_under.append(result["capability"])
    doc = {
        "generator": "torch.randn(numel, dtype=dtype,"
                     " generator=torch.Generator('cpu').manual_seed(seed))",
        "torch_version": torch.__version__,
        "encoding": "values/head/tail are hex bit patterns of the native dtype; sum is float64",
        "head": HEAD,
        "tail": TAIL,
        "note": "ATEN_CPU_CAPABILITY=avx2; the float16/bfloat16 cases are identical under every"
                " capability in same_under",
        "same_under": sorted(set(same_under)),
        **vector,
    }
    out = OUT.with_name(f"randn_torch{major}{minor}.json")
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(vector['cases'])} cases,"
          f" half types identical under {doc['same_under']})")


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
    if len(sys.argv) == 3 and sys.argv[1] in ("--child", "--child-legacy"):
        child(sys.argv[2], legacy=sys.argv[1] == "--child-legacy")
    elif sys.argv[1:] == ["--torch-legacy"]:
        main_legacy()
    elif len(sys.argv) == 1:
        main()
    else:
        sys.exit(f"usage: {sys.argv[0]} [--torch-legacy]")
