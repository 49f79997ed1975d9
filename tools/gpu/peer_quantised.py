"""diffusers beside ours for the quantised MMDiT (issue #15): diffusers' SD3Transformer2DModel from
the bf16 folder and from the Q8_0 GGUF our bench wrote (`from_single_file(...,
quantization_config=GGUFQuantizationConfig(compute_dtype=bf16))`, the `gguf` package's reader and
dequantisation: an independent reader of the file), one forward each on the same inputs as ours
(`sd35_forward.py inputs`: seeded, the CFG batch at SIDE), each timed after a warm-up with its
allocated peak, and the relative L2 of the GGUF forward against the bf16 one — the expectation for
Q8_0 on these very weights, which ours is set beside.

  python3 peer_quantised.py DIR GGUF    # -> $OUT/peer_quantised.json (and a one-line print)

Environment: OUT (/tmp/out, which holds inputs.safetensors), DEVICE (cuda). Needs diffusers and
the `gguf` package (carried as wheels on the GPU machine).
"""
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file

OUT = os.environ.get("OUT", "/tmp/out")
DEVICE = os.environ.get("DEVICE", "cuda")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed_forward(load, x):
    """Loads a model, runs a warm-up and a timed forward: output (f32, CPU), load and eval seconds,
    allocated peak of the evaluation."""
    start = time.time()
    m = load().to(DEVICE)
    sync()
    load_s = time.time() - start
    args = dict(hidden_states=x["latents"].to(DEVICE, torch.bfloat16), timestep=x["timesteps"].to(DEVICE),
                encoder_hidden_states=x["context"].to(DEVICE, torch.bfloat16),
                pooled_projections=x["pooled"].to(DEVICE, torch.bfloat16))
    m(**args)
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    out = m(**args).sample
    sync()
    eval_s = time.time() - start
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None
    out = out.float().cpu()
    del m
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out, {"load_s": round(load_s, 2), "eval_ms": round(eval_s * 1e3, 1), "allocated_peak_bytes": peak}


def main(model_dir, gguf_path):
    from diffusers import GGUFQuantizationConfig, SD3Transformer2DModel
    x = load_file(os.path.join(OUT, "inputs.safetensors"))
    bf16, bf16_stats = timed_forward(lambda: SD3Transformer2DModel.from_pretrained(
        os.path.join(model_dir, "transformer"), torch_dtype=torch.bfloat16), x)
    q8, q8_stats = timed_forward(lambda: SD3Transformer2DModel.from_single_file(
        gguf_path, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16), config=model_dir,
        subfolder="transformer", torch_dtype=torch.bfloat16, local_files_only=True), x)
    res = {"relative_l2_q8_0_vs_bf16": float((q8 - bf16).norm() / bf16.norm()), "bf16": bf16_stats,
           "q8_0": q8_stats, "inputs": {k: list(v.shape) for k, v in x.items()}}
    with open(os.path.join(OUT, "peer_quantised.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("peer_quantised", json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
