"""img2img references for the tiny SD 1.5 (run after make_sd15.py): diffusers'
StableDiffusionImg2ImgPipeline on the CPU in f32, per-image generators seeded seed + i.

Writes testdata/reference/sd15/img2img.json (the cases), img2img.safetensors (per case: `<key>` the
images [n,h,w,3] in [0,1], `<key>_latents` the final latents, `<key>_init` the preprocessed init
image [1,3,h,w] in [-1,1]) and the init images img2img_init.png (64x64) and img2img_init_70x60.png
(70 wide x 60 high: diffusers rounds the size down to a multiple of 8 and resizes with Lanczos).

  python tools/reference/make_img2img.py
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from make_sd15 import SCHEDULERS, setup_determinism  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "testdata/tiny-sd15"
OUT = ROOT / "testdata/reference/sd15"

CASES = [
    dict(name="img2img_s03", init="img2img_init.png", strength=0.3, seeds=[31], steps=10, guidance=7.5, scheduler="pndm"),
    dict(name="img2img_s08", init="img2img_init.png", strength=0.8, seeds=[32], steps=10, guidance=7.5, scheduler="pndm",
         negative_prompt="blurry"),
    dict(name="img2img_ddim", init="img2img_init.png", strength=0.5, seeds=[33], steps=12, guidance=7.5, scheduler="ddim"),
    dict(name="img2img_euler", init="img2img_init.png", strength=0.6, seeds=[34], steps=10, guidance=5.0, scheduler="euler"),
    dict(name="img2img_euler_a_batch2", init="img2img_init.png", strength=0.7, seeds=[35, 36], steps=8, guidance=7.5,
         scheduler="euler-a"),
    dict(name="img2img_strength1", init="img2img_init.png", strength=1.0, seeds=[37], steps=6, guidance=7.5,
         scheduler="pndm"),
    dict(name="img2img_resize", init="img2img_init_70x60.png", strength=0.5, seeds=[38], steps=6, guidance=7.5,
         scheduler="pndm"),
]
PROMPT = "a lighthouse at dusk"


def init_image(width: int, height: int) -> Image.Image:
    """A deterministic picture with gradients, edges and a disc: something a VAE can encode."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 255 * ((np.hypot(x - width * 0.6, y - height * 0.4) < min(width, height) * 0.25) * 0.8 + 0.1)
    img = np.stack([r, g, b], axis=-1)
    img[(x.astype(int) // 8 + y.astype(int) // 8) % 2 == 0] *= 0.85
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))


@torch.no_grad()
def run_cases(cases: list[dict], name: str, pngs: bool) -> None:
    """Runs each case through diffusers' img2img pipeline and writes `<name>.safetensors` and
    `<name>.json` in OUT (and each image under png/ when `pngs`). Shared with make_img2img_dpm.py."""
    from diffusers import StableDiffusionImg2ImgPipeline
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    base = pipe.scheduler
    tensors, results = {}, []
    for case in cases:
        cls, extra = SCHEDULERS[case["scheduler"]]
        pipe.scheduler = cls.from_config(base.config, **extra)
        image = Image.open(OUT / case["init"]).convert("RGB")
        n = len(case["seeds"])
        latents = {}

        def on_step_end(_pipe, step, _t, kwargs):
            latents["last"] = kwargs["latents"].clone()
            return kwargs

        out = pipe(PROMPT, image=image, strength=case["strength"], num_inference_steps=case["steps"],
                   guidance_scale=case["guidance"], negative_prompt=case.get("negative_prompt"), num_images_per_prompt=n,
                   generator=[torch.Generator("cpu").manual_seed(s) for s in case["seeds"]], output_type="np",
                   callback_on_step_end=on_step_end)
        images = torch.from_numpy(out.images)
        key = case["name"]
        tensors[key] = images
        tensors[key + "_latents"] = latents["last"]
        tensors[key + "_init"] = pipe.image_processor.preprocess(image)
        h, w = images.shape[1:3]
        results.append(dict(case, prompt=PROMPT, negative_prompt=case.get("negative_prompt"), width=int(w),
                            height=int(h), key=key, timesteps=[float(t) for t in pipe.scheduler.timesteps]))
        print(f"{key}: {tuple(images.shape)} mean {images.mean():.4f} std {images.std():.4f}")
        if pngs:
            for i in range(n):
                Image.fromarray((out.images[i] * 255).round().astype("uint8")).save(OUT / "png" / f"{key}_{i}.png")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / f"{name}.safetensors"))
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    setup_determinism()
    init_image(64, 64).save(OUT / "img2img_init.png")
    init_image(70, 60).save(OUT / "img2img_init_70x60.png")
    run_cases(CASES, "img2img", pngs=True)


if __name__ == "__main__":
    main()
