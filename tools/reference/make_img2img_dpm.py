"""img2img references for the DPM-Solver++ schedulers (run after make_img2img.py, same set-up:
diffusers' StableDiffusionImg2ImgPipeline on the CPU in f32, per-image generators seeded seed + i).

make_img2img.py covers PNDM, DDIM, Euler and Euler ancestral; this adds "dpm++2m" and
"dpm++2m-karras" (whose `add_noise` is alpha_t x + sigma_t eps and whose multistep history starts
empty at the begin index), at a small non-square size to keep the files small: the init image
img2img_init_50x35.png is resized by diffusers to 48x32 (Lanczos on both axes).

Writes testdata/reference/sd15/img2img_dpm.{json,safetensors} in make_img2img.py's format.

  python tools/reference/make_img2img_dpm.py
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from make_img2img import MODEL, OUT, PROMPT, init_image  # noqa: E402
from make_sd15 import SCHEDULERS, setup_determinism  # noqa: E402

CASES = [
    dict(name="img2img_dpmpp_2m", init="img2img_init_50x35.png", strength=0.6, seeds=[41], steps=10, guidance=7.5,
         scheduler="dpm++2m"),
    dict(name="img2img_dpmpp_2m_karras_batch2", init="img2img_init_50x35.png", strength=0.45, seeds=[42, 43], steps=12,
         guidance=6.0, scheduler="dpm++2m-karras", negative_prompt="blurry"),
]


@torch.no_grad()
def main() -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    setup_determinism()
    init_image(50, 35).save(OUT / "img2img_init_50x35.png")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    base = pipe.scheduler
    tensors, cases = {}, []
    for case in CASES:
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
        cases.append(dict(case, prompt=PROMPT, negative_prompt=case.get("negative_prompt"), width=int(w), height=int(h),
                          key=key, timesteps=[float(t) for t in pipe.scheduler.timesteps]))
        print(f"{key}: {tuple(images.shape)} mean {images.mean():.4f} std {images.std():.4f}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "img2img_dpm.safetensors"))
    (OUT / "img2img_dpm.json").write_text(json.dumps(cases, indent=2) + "\n")


if __name__ == "__main__":
    main()
