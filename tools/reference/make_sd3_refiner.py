#!/usr/bin/env python3
"""SD 3.5 finished by the SDXL refiner from its decoded images, as diffusers does it, on the
committed tiny folders.

Reads (run make_sd3.py and make_sdxl.py first):
  testdata/tiny-sd35-large/      the tiny StableDiffusion3Pipeline
  testdata/tiny-sdxl-refiner/    the tiny StableDiffusionXLImg2ImgPipeline (the refiner)
Writes:
  testdata/reference/sd3/refiner.safetensors, refiner.json
  testdata/reference/README.md   (only the section between the sd3-refiner markers)

Per case: StableDiffusion3Pipeline(..., generator=[seed_i], output_type="pt") gives the base's
images as floats in [0, 1]; StableDiffusionXLImg2ImgPipeline(image=those, strength=...,
generator=[seed_i] fresh, output_type="np") reworks them. This is sdgen's image handoff
(crates/sdgen/src/pipeline/refine_image.rs): no 8-bit rounding between the halves, each half a
pipeline call of its own with its own defaults unless the case sets steps and guidance for both.
Deterministic: one CPU thread, torch.use_deterministic_algorithms(True).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
import transformers
from diffusers import StableDiffusion3Pipeline, StableDiffusionXLImg2ImgPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd15 import CLIP_PROMPTS, save_tensors, setup_determinism, write_readme_section  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BASE_DIR = REPO / "testdata" / "tiny-sd35-large"
REFINER_DIR = REPO / "testdata" / "tiny-sdxl-refiner"
REF_DIR = REPO / "testdata" / "reference" / "sd3"
README_BEGIN, README_END = "<!-- sd3-refiner begin -->", "<!-- sd3-refiner end -->"

PROMPT = CLIP_PROMPTS[0]
NEG = "blurry, low quality"

# `request`: the steps and guidance the run is given, for both halves; None = each half's default:
# the base's sdgen's SD 3.5 Large row (Stability's 28 steps at guidance 3.5, --pro's; diffusers'
# own pipeline default guidance is 7), the refiner's diffusers' StableDiffusionXLImg2ImgPipeline
# defaults (50 steps, guidance 5), which sdgen's SDXL refiner row shares. `strength`: the
# refiner's, None = its default 0.3.
SD35_LARGE_DEFAULTS = dict(steps=28, guidance=3.5)
CASES = [
    # `generate --pro --refiner sdxl-refiner --seed 42` on the tiny folders: every default.
    dict(name="pro_defaults", seeds=[42], negative_prompt=None, width=64, height=64,
         request=dict(steps=None, guidance=None), strength=None),
    # Steps and guidance given (to both halves), a negative prompt, two images, not square.
    dict(name="negative_batch2_nonsquare", seeds=[7, 8], negative_prompt=NEG, width=80, height=64,
         request=dict(steps=8, guidance=4.0), strength=0.5),
]


class Recorder:
    """The timesteps a pipeline ran."""

    def __init__(self):
        self.timesteps = []

    def __call__(self, _pipe, step, t, kwargs):
        assert step == len(self.timesteps)
        self.timesteps.append(float(t))
        return kwargs


def given(d: dict) -> dict:
    names = dict(steps="num_inference_steps", guidance="guidance_scale", strength="strength")
    return {names[k]: v for k, v in d.items() if v is not None}


def halves(case: dict) -> tuple[dict, dict]:
    """The keyword arguments of the base's and the refiner's pipeline calls."""
    req = case["request"]
    base = {k: SD35_LARGE_DEFAULTS[k] if v is None else v for k, v in req.items()}
    return given(base), given({**req, "strength": case["strength"]})


def gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@torch.no_grad()
def run_case(base, refiner, case: dict) -> tuple[dict, dict]:
    n, key = len(case["seeds"]), case["name"]
    prompt = dict(prompt=[PROMPT] * n,
                  negative_prompt=None if case["negative_prompt"] is None else [case["negative_prompt"]] * n)
    base_kwargs, refiner_kwargs = halves(case)
    rec = Recorder()
    images = base(**prompt, width=case["width"], height=case["height"], generator=gens(case["seeds"]),
                  output_type="pt", callback_on_step_end=rec, **base_kwargs).images
    assert images.shape == (n, 3, case["height"], case["width"]) and images.min() >= 0 and images.max() <= 1
    rrec = Recorder()
    refined = refiner(**prompt, image=images, generator=gens(case["seeds"]), output_type="np",
                      callback_on_step_end=rrec, **refiner_kwargs).images
    info = {
        **case, "prompt": PROMPT, "base_call": base_kwargs, "refiner_call": refiner_kwargs,
        "base_timesteps": rec.timesteps,
        "refiner_timesteps": rrec.timesteps,
        "refiner_scheduler": type(refiner.scheduler).__name__,
    }
    base_np = images.permute(0, 2, 3, 1).contiguous()
    change = float((torch.from_numpy(refined) - base_np).abs().mean())
    print(f"  {key}: base {len(rec.timesteps)} steps, refiner {len(rrec.timesteps)} steps "
          f"(from t={rrec.timesteps[0]:.0f}), mean |refined - base| {change:.3f}, std {refined.std():.3f}")
    assert refined.std() > 0.05 and change > 0.005, f"{key}: the refiner changed nothing visible"
    return info, {key: torch.from_numpy(np.ascontiguousarray(refined)), f"{key}_base": base_np}


README_SECTION = """## sd3/refiner.* (make_sd3_refiner.py)

SD 3.5 Large (`../tiny-sd35-large/`) finished by the SDXL refiner (`../tiny-sdxl-refiner/`) from
its decoded images, diffusers {diffusers_version}: `StableDiffusion3Pipeline(output_type="pt")`
with generators seeded per image, its float images (in [0, 1]) passed as `image=` to
`StableDiffusionXLImg2ImgPipeline` with fresh generators of the same seeds (`output_type="np"`).
A case's `request` (steps, guidance) goes to both calls; what it leaves out is each half's
default: sdgen's for SD 3.5 Large (28 steps, guidance 3.5, passed explicitly: diffusers' own
guidance default is 7), the refiner pipeline's own (50 steps, guidance 5); `strength` the
refiner's (default 0.3).

`refiner.safetensors`: per case `<case>` the refined images `[n, h, w, 3]` and `<case>_base` the
base's images before the refiner (channels last, f32 in [0, 1]). `refiner.json`: the cases with
the timesteps each half ran. Cases (prompt {prompt!r}):
{cases}
"""


def case_line(c: dict) -> str:
    neg = "no negative" if c["negative_prompt"] is None else f"negative {c['negative_prompt']!r}"
    return (f"- `{c['name']}` (seeds {c['seeds']}, {c['width']}x{c['height']}, {neg}; base call {c['base_call']}, "
            f"{len(c['base_timesteps'])} steps run; refiner call {c['refiner_call']}, "
            f"{len(c['refiner_timesteps'])} steps run)")


def main() -> None:
    setup_determinism()
    diffusers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    base = StableDiffusion3Pipeline.from_pretrained(BASE_DIR, dtype=torch.float32)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(REFINER_DIR, dtype=torch.float32,
                                                               add_watermarker=False)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    cases, tensors = [], {}
    for case in CASES:
        info, t = run_case(base, refiner, case)
        cases.append(info)
        tensors.update(t)
    save_tensors(REF_DIR / "refiner.safetensors", tensors)
    (REF_DIR / "refiner.json").write_text(json.dumps(cases, indent=2) + "\n", encoding="utf-8")
    write_readme_section(begin=README_BEGIN, end=README_END, section=README_SECTION.format(
        diffusers_version=diffusers.__version__, prompt=PROMPT, cases="\n".join(case_line(c) for c in cases)))
    size = sum((REF_DIR / f).stat().st_size for f in ("refiner.safetensors", "refiner.json"))
    print(f"wrote {REF_DIR.relative_to(REPO)}/refiner.*: {size / 1e3:.1f} KB")


if __name__ == "__main__":
    main()
