#!/usr/bin/env python3
"""diffusers' tiled and sliced VAE decode / encode on the tiny SD 1.5 VAE.

Reads testdata/tiny-sd15/vae (written by make_sd15.py) and writes
  testdata/reference/sd15/vae_tiling.safetensors   inputs and diffusers' outputs (~0.37 MB)
  testdata/reference/sd15/vae_tiling.json          the cases: which keys, tile sizes, switches

The tiny VAE's config has sample_size 64, so diffusers' default tiles (64 px / 8 latents) would
not tile its 64x64 images; each case sets `vae.tile_sample_min_size` / `tile_latent_min_size`
itself (32/4, or 64/8 = the defaults; overlap 0.25 as diffusers fixes it) and calls `enable_tiling()` (and
`enable_slicing()` where the case says so), then goes through the public `vae.decode(z)` /
`vae.encode(x)` entry points, so diffusers' own dispatch (tile only when larger than a tile)
is exercised. Latent sizes 8x8, 8x12 and 13x9 leave partial tiles, down to one latent cell. (Not every
geometry is sound: 16/2 tiles every 8 px but keeps 12 px of each, and diffusers then returns an
image of the wrong size; sdgen rejects such geometries.)
The encode inputs are the decode outputs (images of the right sizes, nothing extra stored).

Deterministic like make_sd15.py: seeded inputs, one CPU thread, deterministic algorithms.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL

REPO = Path(__file__).resolve().parents[2]
VAE_DIR = REPO / "testdata" / "tiny-sd15" / "vae"
OUT = REPO / "testdata" / "reference" / "sd15" / "vae_tiling"

# (key, latent shape, seed, tile_sample_min_size, tile_latent_min_size, slicing)
DECODE_CASES = [
    ("dec_8x8", (2, 4, 8, 8), 401, 32, 4, False),
    ("dec_8x12", (1, 4, 8, 12), 402, 32, 4, False),
    ("dec_13x9", (1, 4, 13, 9), 403, 32, 4, False),
    ("dec_13x9_t64", (1, 4, 13, 9), 403, 64, 8, False),  # the tiny VAE's defaults (sample_size 64)
]
# (key, input image = the output of this decode case, tile sizes, slicing)
ENCODE_CASES = [
    ("enc_64x64", "dec_8x8", 32, 4, False),
    ("enc_104x72", "dec_13x9", 32, 4, False),
    ("enc_64x64_sliced", "dec_8x8", 32, 4, True),
]


def seeded_randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def configure(vae: AutoencoderKL, sample: int, latent: int, slicing: bool) -> None:
    vae.tile_sample_min_size = sample
    vae.tile_latent_min_size = latent
    vae.tile_overlap_factor = 0.25
    vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    else:
        vae.disable_slicing()


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    vae = AutoencoderKL.from_pretrained(VAE_DIR).eval()

    tensors: dict[str, torch.Tensor] = {}
    cases = []
    for key, shape, seed, sample, latent, slicing in DECODE_CASES:
        z = seeded_randn(shape, seed)
        configure(vae, sample, latent, slicing)
        out = vae.decode(z).sample
        vae.disable_tiling()
        vae.disable_slicing()
        plain = vae.decode(z).sample
        rel = float((out - plain).abs().max() / plain.abs().max())
        print(f"{key}: {list(z.shape)} -> {list(out.shape)}, tiled vs plain max|diff|/max|plain| {rel:.3e}")
        assert out.shape == plain.shape
        tensors[f"{key}.latents"] = z
        tensors[f"{key}.image"] = out
        cases.append(dict(key=key, op="decode", tile_sample_min_size=sample, tile_latent_min_size=latent,
                          tile_overlap_factor=0.25, slicing=slicing))

    for key, source, sample, latent, slicing in ENCODE_CASES:
        x = tensors[f"{source}.image"]
        configure(vae, sample, latent, slicing)
        dist = vae.encode(x).latent_dist
        vae.disable_tiling()
        vae.disable_slicing()
        plain = vae.encode(x).latent_dist
        rel = float((dist.mean - plain.mean).abs().max() / plain.mean.abs().max())
        print(f"{key}: {list(x.shape)} -> {list(dist.mean.shape)}, tiled vs plain mean rel diff {rel:.3e}")
        assert dist.mean.shape == plain.mean.shape
        tensors[f"{key}.mean"] = dist.mean
        tensors[f"{key}.logvar"] = dist.logvar
        cases.append(dict(key=key, op="encode", input=f"{source}.image", tile_sample_min_size=sample,
                          tile_latent_min_size=latent, tile_overlap_factor=0.25, slicing=slicing))

    # The seam test's input: a smooth latent (coarse noise, bilinearly upsampled), 16x16 so a
    # 4-latent tile leaves 5 tile borders each way. Only the latent is stored: the test decodes
    # it with sdgen (whose tiled decode the cases above check against diffusers).
    coarse = seeded_randn((1, 4, 4, 4), 404)
    tensors["smooth.latents"] = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")

    # diffusers' slicing is per-image decoding (each image tiled alone): a self-check that the
    # switches take effect. sdgen's sliced+tiled decode is compared with dec_8x8.image, which
    # differs from this only by batch-size-dependent rounding.
    configure(vae, 32, 4, True)
    sliced = vae.decode(tensors["dec_8x8.latents"]).sample
    configure(vae, 32, 4, False)
    per_image = torch.cat([vae.decode(z).sample for z in tensors["dec_8x8.latents"].split(1)])
    assert torch.equal(per_image, sliced), "slicing is not per-image decode"
    batch_rel = float((sliced - tensors["dec_8x8.image"]).abs().max() / tensors["dec_8x8.image"].abs().max())
    print(f"dec_8x8 sliced vs batched: max|diff|/max|ref| {batch_rel:.3e}")
    vae.disable_tiling()
    vae.disable_slicing()

    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT.with_suffix(".safetensors")))
    meta = {
        "about": "tools/reference/make_vae_tiling.py: diffusers tiled/sliced AutoencoderKL on testdata/tiny-sd15/vae",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    OUT.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    OUT.with_suffix(".safetensors").chmod(0o644)  # save_file creates it 0600
    size = OUT.with_suffix(".safetensors").stat().st_size
    print(f"wrote {OUT}.safetensors ({size / 1024:.0f} KiB) and .json")


if __name__ == "__main__":
    main()
