#!/usr/bin/env python3
"""diffusers' bf16 images of the tiny SD 1.5 on the CPU, for the bf16 CPU pipeline test.

Writes (relative to the repository root):
  testdata/reference/sd15/pipeline_bf16.safetensors   per case, the images [n, h, w, 3] in [0, 1]
  testdata/reference/sd15/pipeline_bf16.json          the cases (make_sd15.py's, by name) and,
                                                      per case, how far diffusers' own bf16 images
                                                      are from its f32 ones (pipeline.safetensors)

The pipeline is loaded the way a user runs it: `StableDiffusionPipeline.from_pretrained(
testdata/tiny-sd15, torch_dtype=torch.bfloat16)`, the case's scheduler built from the folder's own
config (make_sd15.py's `call_pipeline`); one thread, deterministic algorithms. bf16 keeps 8
significant bits, and the tiny random weights amplify each rounding through the steps, so two
correct bf16 implementations (torch's oneDNN kernels and ours) differ by about as much as bf16
differs from f32: the f32 distance is recorded as that noise floor for the test's tolerance.
Run after make_sd15.py (it reads the tiny model and the f32 images).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffusers import StableDiffusionPipeline
from make_sd15 import MODEL_DIR, PIPELINE_CASES, REF_DIR, run_case, setup_determinism

# An image per scheduler family (multistep PNDM, DDIM, ancestral Euler with its step noise in
# bf16) and a batch under CFG.
CASES = ["pndm_basic", "ddim", "euler_a_batch2"]


def distance(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean and largest |a − b| in 1/255 steps, and the share of values within 1/255."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) * 255.0
    return {"mean_255": float(d.mean()), "max_255": float(d.max()), "within_1_255": float((d <= 1.0).mean())}


@torch.no_grad()
def main() -> None:
    setup_determinism()
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.bfloat16, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    f32_images = load_file(str(REF_DIR / "pipeline.safetensors"))
    cases = {c["name"]: c for c in PIPELINE_CASES}
    tensors, cases_json = {}, []
    for name in CASES:
        case = cases[name]
        images = run_case(pipe, case)["images"].astype(np.float32)
        floor = distance(images, f32_images[name].numpy())
        print(f"{name}: diffusers bf16 vs f32 {floor}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(images))
        cases_json.append({"name": name, "key": name, "bf16_vs_f32": floor})
    save_file(tensors, str(REF_DIR / "pipeline_bf16.safetensors"))
    meta = {"torch": torch.__version__, "cases": cases_json}
    (REF_DIR / "pipeline_bf16.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
