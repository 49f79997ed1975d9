#!/usr/bin/env python3
"""Reference images of the empty prompt, as diffusers makes them: `pipe(prompt="")` on the tiny
SD 1.5 and the tiny SDXL, loaded with `from_pretrained` and run with their folders' schedulers,
no negative prompt. diffusers encodes "" as any text (the tokenizer's start and end tokens, then
padding) — SDXL's `force_zeros_for_empty_prompt` zeroes only the *negative* side when none is
given — which is what A1111 does with its default `prompt: ""`; `generate ""` and the server's
empty prompts must give these images.

Writes (relative to the repository root):
  testdata/reference/empty_prompt/sd15.safetensors  `pipeline_image` [1, 64, 64, 3], f32 in [0, 1]
  testdata/reference/empty_prompt/sdxl.safetensors  the same on the tiny SDXL
  testdata/reference/empty_prompt/cases.json        the settings of each (seed, steps, guidance, size)

Run with the pinned stack (tools/reference/requirements.txt), f32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata/reference/empty_prompt"
CASES = {
    "sd15": dict(pipeline=StableDiffusionPipeline, model="testdata/tiny-sd15", seed=7, steps=4, guidance=7.5),
    "sdxl": dict(pipeline=StableDiffusionXLPipeline, model="testdata/tiny-sdxl", seed=7, steps=4, guidance=5.0),
}


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.logging.set_verbosity_error()
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {}
    for name, case in CASES.items():
        pipe = case["pipeline"].from_pretrained(ROOT / case["model"], torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompt="", num_inference_steps=case["steps"], guidance_scale=case["guidance"], width=64,
                   height=64, generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np")
        save_file({"pipeline_image": torch.from_numpy(out.images).contiguous()}, str(OUT / f"{name}.safetensors"))
        meta[name] = {k: v for k, v in case.items() if k != "pipeline"} | {"width": 64, "height": 64}
        print(name, out.images.shape, float(out.images.mean()))
    (OUT / "cases.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
