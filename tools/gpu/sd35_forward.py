"""One SD 3.5 MMDiT forward at full size, ours against diffusers' on the same inputs (the check a
whole random-weight image cannot make: with random weights the 28-block residual stream is so
sensitive that diffusers' own bf16 and f32 images differ as two unrelated images do).

  python3 sd35_forward.py inputs DIR      # seeded inputs at 1024² with the CFG batch -> $OUT/inputs.safetensors
  python3 sd35_forward.py reference DIR   # diffusers' forward in f32 and bf16 -> $OUT/reference.safetensors
  python3 sd35_forward.py compare         # ours ($OUT/ours-{f32,bf16}.safetensors) against them

DIR is a diffusers folder of SD 3.5 (its transformer/ is read). Writes $OUT/forward.json.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

OUT = os.environ.get("OUT", "/tmp/out")
SIDE = int(os.environ.get("SIDE", "1024"))
DEVICE = os.environ.get("DEVICE", "cuda")


def inputs(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "transformer", "config.json")))
    g = torch.Generator("cpu").manual_seed(7)
    lat = SIDE // 8
    x = {
        "latents": torch.randn(2, cfg["in_channels"], lat, lat, generator=g),
        "timesteps": torch.tensor([500.0, 500.0]),
        "context": torch.randn(2, 77 + 256, cfg["joint_attention_dim"], generator=g),
        "pooled": torch.randn(2, cfg["pooled_projection_dim"], generator=g),
    }
    save_file(x, os.path.join(OUT, "inputs.safetensors"))
    print("inputs", {k: list(v.shape) for k, v in x.items()})


@torch.no_grad()
def reference(model_dir):
    from diffusers import SD3Transformer2DModel
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x = load_file(os.path.join(OUT, "inputs.safetensors"))
    refs = {}
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        m = SD3Transformer2DModel.from_pretrained(os.path.join(model_dir, "transformer"), torch_dtype=dtype).to(DEVICE)
        out = m(hidden_states=x["latents"].to(DEVICE, dtype), timestep=x["timesteps"].to(DEVICE),
                encoder_hidden_states=x["context"].to(DEVICE, dtype),
                pooled_projections=x["pooled"].to(DEVICE, dtype)).sample
        refs[name] = out.float().cpu().contiguous()
        del m, out
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    save_file(refs, os.path.join(OUT, "reference.safetensors"))
    print("reference", {k: float(v.abs().max()) for k, v in refs.items()})


def stats(a, b):
    """Relative L2 of a against b, and the largest difference over b's largest magnitude."""
    return {"rel_l2": float((a - b).norm() / b.norm()), "max_abs_over_max": float((a - b).abs().max() / b.abs().max())}


def compare():
    refs = load_file(os.path.join(OUT, "reference.safetensors"))
    res = {"diffusers_bf16_vs_f32": stats(refs["bf16"], refs["f32"])}
    for name in ("f32", "bf16"):
        path = os.path.join(OUT, f"ours-{name}.safetensors")
        if not os.path.exists(path):
            res[f"ours_{name}"] = "no output of ours"
            continue
        ours = load_file(path)["output"]
        res[f"ours_{name}_vs_diffusers_f32"] = stats(ours, refs["f32"])
        res[f"ours_{name}_vs_diffusers_{name}"] = stats(ours, refs[name])
    print(json.dumps(res, indent=1))
    json.dump(res, open(os.path.join(OUT, "forward.json"), "w"), indent=1)


if __name__ == "__main__":
    {"inputs": lambda: inputs(sys.argv[2]), "reference": lambda: reference(sys.argv[2]), "compare": compare}[sys.argv[1]]()
