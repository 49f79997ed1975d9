"""peer_diffusers.py's parts with torch's reserved peak beside each allocated peak (the caching
allocator's pool: the closest torch figure to a device-wide peak). Usage: as peer_diffusers.py
(`python3 tools/gpu/peer_reserved.py modes`), with its copy in .carry/ (../shared does not travel)."""
import os, sys
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".carry"))
import peer_diffusers as p

orig = p.report
def report(k, v):
    orig(k, v)
    if k.endswith("_peak_GB"):
        orig(k[: -len("_peak_GB")] + "_reserved_peak_GB", round(torch.cuda.max_memory_reserved() / 1e9, 2))
p.report = report
for part in sys.argv[1:]:
    getattr(p, "part_" + part)()
