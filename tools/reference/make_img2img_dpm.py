"""img2img references for the DPM-Solver++ schedulers (run after make_img2img.py, same set-up:
diffusers' StableDiffusionImg2ImgPipeline on the CPU in f32, per-image generators seeded seed + i).

make_img2img.py covers PNDM, DDIM, Euler and Euler ancestral; this adds "dpm++2m" and
"dpm++2m-karras" (whose `add_noise` is alpha_t x + sigma_t eps and whose multistep history starts
empty at the begin index), at a small non-square size to keep the files small: the init image
img2img_init_50x35.png is resized by diffusers to 48x32 (Lanczos on both axes).

Writes testdata/reference/sd15/img2img_dpm.{json,safetensors} in make_img2img.py's format.

  python tools/reference/make_img2img_dpm.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_img2img import OUT, init_image, run_cases  # noqa: E402
from make_sd15 import setup_determinism  # noqa: E402

CASES = [
    dict(name="img2img_dpmpp_2m", init="img2img_init_50x35.png", strength=0.6, seeds=[41], steps=10, guidance=7.5,
         scheduler="dpm++2m"),
    dict(name="img2img_dpmpp_2m_karras_batch2", init="img2img_init_50x35.png", strength=0.45, seeds=[42, 43], steps=12,
         guidance=6.0, scheduler="dpm++2m-karras", negative_prompt="blurry"),
]


def main() -> None:
    setup_determinism()
    init_image(50, 35).save(OUT / "img2img_init_50x35.png")
    run_cases(CASES, "img2img_dpm", pngs=False)


if __name__ == "__main__":
    main()
