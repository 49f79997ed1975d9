"""PIL Lanczos resize references for sdgen's image_io (a bit-exact port of PIL's ImagingResample).

Writes testdata/image_io/lanczos_pil.safetensors: `src.<name>` the source RGB images [h,w,3] u8 and
`out.<name>.<W>x<H>` PIL's `Image.resize((W, H), Image.LANCZOS)` of each, up and down, one axis at a
time, both pass orders (PIL shrinks height first when it shrinks it more than twice as much as the
width), 1-pixel outputs and large factors.

  python tools/reference/make_resize.py
  python tools/reference/make_resize.py --sweep /tmp/sweep.safetensors   # random sizes, not committed

Also writes testdata/image_io/upscale_pil.safetensors for `--upscale N` (issue #14): the tiny models'
finished images (SD 1.5, SDXL base, SDXL base + refiner, a non-square SDXL batch image, from
testdata/reference/*/png/) as `src.<name>` and PIL's `Image.resize((N·W, N·H), Image.LANCZOS)` of each
as `out.<name>.x<N>` for N = 2, 3, 4 (run make_sd15.py and make_sdxl.py first).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata/image_io"


def sources() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240607)
    noise = rng.integers(0, 256, size=(23, 37, 3), dtype=np.uint8)
    noise[:5, :9] = 255  # saturated blocks: Lanczos overshoots and PIL clips
    noise[-6:, -7:] = 0
    y, x = np.mgrid[0:60, 0:70].astype(np.float32)
    grad = np.stack([255 * x / 69, 255 * y / 59, 255 * ((np.hypot(x - 42, y - 24) < 15) * 0.8 + 0.1)], -1)
    grad[(x.astype(int) // 8 + y.astype(int) // 8) % 2 == 0] *= 0.85
    grad = np.clip(np.round(grad), 0, 255).astype(np.uint8)
    tall = rng.integers(0, 256, size=(90, 20, 3), dtype=np.uint8)
    tall[::7] = 255
    return {"noise": noise, "grad": grad, "tall": tall}


TARGETS = {
    "noise": [(16, 16), (8, 8), (1, 1), (37, 11), (18, 23), (60, 30), (74, 46), (50, 10), (5, 40), (36, 22)],
    "grad": [(64, 56), (32, 24), (64, 48), (140, 12), (70, 8), (8, 60), (35, 61), (7, 3)],
    "tall": [(20, 30), (18, 30), (16, 8), (40, 45), (20, 91), (3, 90), (30, 100)],
}


def sweep(path: str, count: int = 400) -> None:
    """Random sources and sizes (1 to 5x up, down to 1 pixel) for the ignored sweep test."""
    rng = np.random.default_rng(7)
    tensors = {}
    for i in range(count):
        w, h = (int(v) for v in rng.integers(1, 60, size=2))
        src = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        if i % 3 == 0:
            src = np.repeat(np.repeat(src[::4, ::4], 4, 0), 4, 1)[:h, :w].copy()  # flat blocks
        W, H = (max(1, int(round(v * f))) for v, f in zip((w, h), rng.uniform(0.05, 5.0, size=2)))
        if i % 5 == 0:
            W = w  # one axis only
        tensors[f"src.{i}"] = np.ascontiguousarray(src)
        tensors[f"out.{i}"] = np.asarray(Image.fromarray(src).resize((W, H), Image.LANCZOS))
    save_file(tensors, path)


# The tiny models' finished images that `--upscale` is checked on.
UPSCALE_SOURCES = {
    "sd15": "reference/sd15/png/pndm_basic_0.png",
    "sdxl": "reference/sdxl/png/base_0.png",
    "sdxl_refined": "reference/sdxl/png/ensemble_0.png",
    "sdxl_nonsquare": "reference/sdxl/png/base_batch2_nonsquare_1.png",
}


def upscale() -> None:
    tensors = {}
    for name, rel in UPSCALE_SOURCES.items():
        im = Image.open(ROOT / "testdata" / rel).convert("RGB")
        tensors[f"src.{name}"] = np.asarray(im)
        for factor in (2, 3, 4):
            size = (im.width * factor, im.height * factor)
            tensors[f"out.{name}.x{factor}"] = np.asarray(im.resize(size, Image.LANCZOS))
    save_file(tensors, str(OUT / "upscale_pil.safetensors"))
    print(f"upscale: {len(tensors)} tensors, {sum(t.nbytes for t in tensors.values())} bytes")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--sweep":
        return sweep(sys.argv[2])
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, src in sources().items():
        tensors[f"src.{name}"] = src
        im = Image.fromarray(src)
        for w, h in TARGETS[name]:
            tensors[f"out.{name}.{w}x{h}"] = np.asarray(im.resize((w, h), Image.LANCZOS))
    save_file(tensors, str(OUT / "lanczos_pil.safetensors"))
    total = sum(t.nbytes for t in tensors.values())
    print(f"{len(tensors)} tensors, {total} bytes")
    upscale()


if __name__ == "__main__":
    main()
