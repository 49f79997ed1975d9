#!/usr/bin/env python3
"""Builds the tiny random-weight SD 1.5 model and its diffusers reference outputs.

Writes (relative to the repository root):
  testdata/tiny-sd15/                 a StableDiffusionPipeline saved in the hub's layout (f32)
  testdata/reference/sd15/*.safetensors, pipeline.json, png/
  testdata/reference/README.md        (only the section between the sd15 markers)

Everything is deterministic: seeded weights, seeded inputs, one CPU thread and
torch.use_deterministic_algorithms(True); re-running gives byte-identical files
(with the pinned versions of tools/reference/requirements.txt).

The model itself (tokenizer files, configs, seeded weights) is built by sd15_tiny.py. The
tokenizer is the real CLIP BPE vocabulary cut to its first NUM_MERGES merges; the merges file
ships in the open_clip_torch wheel, found in an installed open_clip package, at --bpe PATH, or
downloaded (the wheel alone, no dependencies) with pip. ftfy must not be installed (a
convention of these references: transformers' former slow CLIPTokenizer cleaned text differently
when it was present).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from transformers import CLIPTokenizer

from sd15_tiny import (
    BPE_NAME,
    NUM_MERGES,
    SD15_SCHEDULER,
    SD15_SCHEDULER_FILE,
    UNET_CONFIG,
    VAE_CONFIG,
    build_text_encoder,
    build_unet,
    build_vae,
    build_vocab,
    find_bpe,
    nparams,
    openai_encode,
    write_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "testdata" / "tiny-sd15"
REF_DIR = REPO / "testdata" / "reference" / "sd15"
REF_README = REPO / "testdata" / "reference" / "README.md"
# How far image i of a batch may be from the same seed's n=1 image (see main()).
BATCH_IMAGE_ATOL = 1e-4

CLIP_PROMPTS = [
    "a lighthouse at dusk",
    "A Photo of 2 cats, sitting on a RED sofa!! Highly-detailed, 4k, trending on artstation; "
    "cinematic lighting & soft shadows, by Greg Rutkowski and Alphonse Mucha, octane render, "
    "unreal engine, sharp focus, masterpiece",
]

PIPELINE_CASES = [
    dict(name="pndm_basic", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[42],
         steps=10, guidance=7.5, width=64, height=64, scheduler="pndm"),
    dict(name="pndm_negative", prompt="a lighthouse at dusk", negative_prompt="blurry, low quality",
         seeds=[42], steps=10, guidance=7.5, width=64, height=64, scheduler="pndm"),
    dict(name="batch2", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[7, 8],
         steps=8, guidance=7.5, width=64, height=64, scheduler="pndm"),
    dict(name="ddim", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[3],
         steps=12, guidance=7.5, width=64, height=64, scheduler="ddim"),
    dict(name="euler", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[5],
         steps=12, guidance=5.0, width=64, height=64, scheduler="euler"),
    dict(name="nonsquare", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[11],
         steps=6, guidance=7.5, width=64, height=80, scheduler="pndm"),
    dict(name="guidance1", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[13],
         steps=6, guidance=1.0, width=64, height=64, scheduler="pndm"),
    dict(name="euler_a", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[21],
         steps=10, guidance=7.5, width=64, height=64, scheduler="euler-a"),
    dict(name="dpmpp_2m", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[22],
         steps=10, guidance=7.5, width=64, height=64, scheduler="dpm++2m"),
    dict(name="dpmpp_2m_karras", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[23],
         steps=10, guidance=7.5, width=64, height=64, scheduler="dpm++2m-karras"),
    dict(name="euler_a_batch2", prompt="a lighthouse at dusk", negative_prompt=None, seeds=[24, 25],
         steps=10, guidance=7.5, width=64, height=64, scheduler="euler-a"),
]

# A case's `scheduler` (sdgen's --scheduler name) -> the diffusers class built with
# `Cls.from_config(pipe.scheduler.config, **extra)`.
SCHEDULERS = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


def setup_determinism() -> None:
    """One thread and deterministic kernels: the outputs must not depend on the machine's cores."""
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))


def seeded_randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@torch.no_grad()
def make_clip(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    tok = pipe.tokenizer(
        CLIP_PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    )
    ids = tok.input_ids.to(torch.int64)
    out = pipe.text_encoder(ids, output_hidden_states=True)
    eos = pipe.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    first_eos = (ids == eos).int().argmax(dim=-1)
    assert torch.equal(first_eos, ids.argmax(dim=-1)), "pooling rules disagree"
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), first_eos])
    print(f"clip: input_ids[0][:8]={ids[0, :8].tolist()} eos positions={first_eos.tolist()}")
    assert first_eos.tolist() == [11, 76], "README.md describes the eos positions as 11 and 76"
    return {
        "input_ids": ids,
        "last_hidden_state": out.last_hidden_state,
        "penultimate_hidden_state": out.hidden_states[-2],
        "pooled": out.pooler_output,
    }


@torch.no_grad()
def make_unet(pipe: StableDiffusionPipeline, clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    unet = pipe.unet
    sample = seeded_randn((2, 4, 8, 8), 201)
    timestep = torch.tensor([801.0], dtype=torch.float32)
    ehs = clip["last_hidden_state"]
    out = unet(sample, timestep, encoder_hidden_states=ehs).sample
    odd_sample = seeded_randn((1, 4, 8, 10), 202)
    odd_timestep = torch.tensor([537.25], dtype=torch.float32)
    odd_ehs = clip["last_hidden_state"][1:2]
    odd_out = unet(odd_sample, odd_timestep, encoder_hidden_states=odd_ehs).sample
    print(f"unet: out std {out.std():.4f}, odd_out std {odd_out.std():.4f}")
    return {
        "sample": sample,
        "timestep": timestep,
        "encoder_hidden_states": ehs,
        "out": out,
        "odd_sample": odd_sample,
        "odd_timestep": odd_timestep,
        "odd_encoder_hidden_states": odd_ehs,
        "odd_out": odd_out,
    }


@torch.no_grad()
def make_vae(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    vae = pipe.vae
    # A smooth image (upsampled coarse noise) plus fine noise, squashed into [-1, 1].
    coarse = seeded_randn((1, 3, 8, 8), 301)
    fine = seeded_randn((1, 3, 64, 64), 302)
    image = torch.tanh(torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bilinear") + 0.3 * fine)
    dist = vae.encode(image).latent_dist
    decoded = vae.decode(dist.mean).sample
    latent_in = seeded_randn((2, 4, 8, 8), 303)
    decoded_random = vae.decode(latent_in).sample
    print(f"vae: mean std {dist.mean.std():.4f}, logvar mean {dist.logvar.mean():.4f}, decoded std {decoded.std():.4f}")
    return {
        "image": image,
        "latent_mean": dist.mean,
        "latent_logvar": dist.logvar,
        "decoded": decoded,
        "latent_in": latent_in,
        "decoded_random": decoded_random,
    }


def call_pipeline(pipe: StableDiffusionPipeline, case: dict, seeds: list[int], generators=None, **extra) -> tuple:
    """Runs `case` as the README describes, with the case's scheduler swapped in for the call.
    `generators` (default: fresh ones seeded `seeds`) go to both the initial noise and the steps.

    Returns (output, scheduler used)."""
    base_scheduler = pipe.scheduler
    cls, cls_extra = SCHEDULERS[case["scheduler"]]
    pipe.scheduler = cls.from_config(base_scheduler.config, **cls_extra)
    n = len(seeds)
    if generators is None:
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    try:
        out = pipe(
            prompt=[case["prompt"]] * n,
            negative_prompt=None if case["negative_prompt"] is None else [case["negative_prompt"]] * n,
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance"],
            width=case["width"],
            height=case["height"],
            generator=generators,
            output_type="np",
            **extra,
        )
        return out, pipe.scheduler
    finally:
        pipe.scheduler = base_scheduler


@torch.no_grad()
def run_case(pipe: StableDiffusionPipeline, case: dict, seeds: list[int] | None = None) -> dict:
    """One pipeline call; returns images (np f32 [n,h,w,3]), final latents, initial noise, timesteps."""
    seeds = seeds if seeds is not None else case["seeds"]
    captured = {}

    def on_step_end(_pipe, step, _t, kwargs):
        captured["latents"] = kwargs["latents"].clone()
        captured["last_step"] = step
        return kwargs

    out, sched = call_pipeline(pipe, case, seeds, callback_on_step_end=on_step_end)
    timesteps = [float(t) for t in sched.timesteps]
    assert captured["last_step"] == len(timesteps) - 1
    lat_shape = (1, 4, case["height"] // 8, case["width"] // 8)
    # Exactly what diffusers' randn_tensor draws per image; the pipeline then multiplies it by
    # the scheduler's init_noise_sigma (1 for PNDM/DDIM, sqrt(sigma_max^2 + 1) for Euler).
    noise = torch.cat([torch.randn(lat_shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
    sched_config = {"class": type(sched).__name__}
    # JSON has no infinities (DPM-Solver's lambda_min_clipped defaults to -inf): write them as text.
    sched_config.update(
        {
            k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in sched.config.items()
            if not k.startswith("_")
        }
    )
    return dict(
        images=out.images,
        latents=captured["latents"],
        noise=noise,
        timesteps=timesteps,
        init_noise_sigma=float(sched.init_noise_sigma),
        scheduler_config=sched_config,
    )


@torch.no_grad()
def check_case(pipe: StableDiffusionPipeline, case: dict, res: dict) -> None:
    """Self-checks: the captured latents decode to the images, and the noise is the pipeline's."""
    vae = pipe.vae
    dec = vae.decode(res["latents"] / vae.config.scaling_factor, return_dict=False)[0]
    img = pipe.image_processor.postprocess(dec, output_type="np", do_denormalize=[True] * dec.shape[0])
    assert np.array_equal(img, res["images"]), f"{case['name']}: latents do not decode to the images"
    # Passing `latents=` skips the pipeline's own draw, so hand it generators that have already
    # drawn the saved noise: ancestral schedulers then draw their step noise from the same state.
    generators = [torch.Generator("cpu").manual_seed(s) for s in case["seeds"]]
    redrawn = torch.cat([torch.randn((1, *res["noise"].shape[1:]), generator=g) for g in generators])
    assert torch.equal(redrawn, res["noise"]), f"{case['name']}: the saved noise is not what the seeds draw"
    again, _ = call_pipeline(pipe, case, case["seeds"], generators=generators, latents=res["noise"].clone())
    assert np.array_equal(again.images, res["images"]), f"{case['name']}: the saved noise is not the pipeline's"


def image_stats(name: str, images: np.ndarray) -> None:
    sat = float(((images <= 0.0) | (images >= 1.0)).mean())
    print(
        f"  {name}: shape {list(images.shape)} mean {images.mean():.3f} std {images.std():.3f} "
        f"min {images.min():.3f} max {images.max():.3f} saturated {sat:.1%}"
    )
    assert images.std() > 0.1, f"{name}: images are too flat"
    assert sat < 0.5, f"{name}: images are mostly saturated"


def numpy_to_png(images: np.ndarray, stem: str) -> None:
    """diffusers' numpy_to_pil: uint8 = round(x * 255)."""
    png_dir = REF_DIR / "png"
    for i, im in enumerate((images * 255).round().astype("uint8")):
        Image.fromarray(im).save(png_dir / f"{stem}_{i}.png")


# ---------------------------------------------------------------------------------------------
# README section
# ---------------------------------------------------------------------------------------------

README_BEGIN = "<!-- BEGIN sd15 (tools/reference/make_sd15.py) -->"
README_END = "<!-- END sd15 -->"

README_SECTION = """\
## sd15/ and ../tiny-sd15/ (tools/reference/make_sd15.py)

### ../tiny-sd15/
A random-weight SD 1.5 in the hub's diffusers layout, all f32, ~1.5 MB: model_index.json
(safety_checker/feature_extractor null, requires_safety_checker false), unet/ and vae/
(`config.json`, `diffusion_pytorch_model.safetensors`), text_encoder/ (`config.json`,
`model.safetensors`), tokenizer/, scheduler/. Deliberately like the real files where a current
`save_pretrained` would differ:
- tokenizer/ has the hub's four files (vocab.json, merges.txt with its `#version: 0.2` line,
  tokenizer_config.json, special_tokens_map.json) and no tokenizer.json. Vocabulary {vocab_size}:
  the 256 byte characters (openai's bytes_to_unicode order), the same + `</w>`, the first
  {num_merges} CLIP merges joined, then `<|startoftext|>` = {bos}, `<|endoftext|>` = {eos}
  (also pad and unk). model_max_length 77.
- text_encoder/model.safetensors uses the `text_model.` key prefix and carries the int64
  `text_model.embeddings.position_ids` [1,77], as SD 1.5's own file does (transformers 5 would
  save neither).
- scheduler/scheduler_config.json is SD 1.5's verbatim (`_diffusers_version` 0.6.0): it has no
  `prediction_type` / `timestep_spacing`, so `X.from_config` fills those from X's defaults
  (Euler: `timestep_spacing` "linspace", DDIM and PNDM: "leading"), and `clip_sample` false.
- The VAE's mid-block attention keys use diffusers' current names (`to_q/to_k/to_v/to_out.0`),
  not the `query/key/value/proj_attn` of older files.

Sizes: CLIP hidden 32, 3 layers, 4 heads, intermediate 37, quick_gelu; config bos/eos/pad ids
0/2/1 as in SD 1.5, so transformers pools at `argmax(input_ids)` (legacy rule for
eos_token_id == 2), i.e. at the first `<|endoftext|>`, the largest id -- the newer "first
eos_token_id" rule gives the same positions here. UNet block_out_channels {unet_ch}, 2 layers
per block, 4 heads everywhere (`attention_head_dim` = 4 is SD 1.5's legacy name for the head
count), norm_num_groups {unet_groups}, cross_attention_dim 32, time embedding 32. VAE
block_out_channels {vae_ch}, 1 layer per block, norm_num_groups {vae_groups}, scale factor 8,
scaling_factor 0.18215. Every tensor is non-trivial (norm scales ~1 +- 0.1, shifts and biases
nonzero), so a loader that drops one changes the outputs.

All tensors below are f32 unless noted, contiguous, NCHW unless noted.

### sd15/clip.safetensors
Two prompts tokenized as the pipeline does (`padding="max_length"`, `max_length=77`,
`truncation=True`): "a lighthouse at dusk" (eos at 11) and a long prompt that is truncated (eos
at 76). The text encoder runs without attention mask (causal mask only), as in the pipeline.
- `input_ids` i64 [2,77]
- `last_hidden_state` [2,77,32]: after final_layer_norm; the pipeline's prompt_embeds
- `penultimate_hidden_state` [2,77,32]: `hidden_states[-2]`, raw (no final_layer_norm)
- `pooled` [2,32]: `pooler_output` (last_hidden_state at the eos position)

### sd15/unet.safetensors
- `sample` [2,4,8,8], `timestep` [1] = 801.0 (broadcast over the batch),
  `encoder_hidden_states` [2,77,32] (= clip `last_hidden_state`), `out` [2,4,8,8]
- `odd_sample` [1,4,8,10] (10 -> 5 -> 3 on the way down: upsampling must take the skip's size,
  diffusers' `forward_upsample_size`), `odd_timestep` [1] = 537.25 (fractional),
  `odd_encoder_hidden_states` [1,77,32] (the second prompt's), `odd_out` [1,4,8,10]

### sd15/vae.safetensors
- `image` [1,3,64,64] in [-1,1]
- `latent_mean`, `latent_logvar` [1,4,8,8]: the encoder's moments (after quant_conv) split in
  two along channels as diffusers' DiagonalGaussianDistribution does (logvar clamped to
  [-30, 20])
- `decoded` [1,3,64,64] = `vae.decode(latent_mean).sample` (no scaling_factor, no clamp)
- `latent_in` [2,4,8,8] random, `decoded_random` [2,3,64,64] = `vae.decode(latent_in).sample`

### sd15/pipeline.json, sd15/pipeline.safetensors, sd15/png/
`StableDiffusionPipeline` on the CPU in f32, loaded from ../tiny-sd15 with `from_pretrained`,
`generator=[Generator("cpu").manual_seed(s) for s in seeds]`, `output_type="np"`.
pipeline.json is a list of cases with `name`, `prompt`, `negative_prompt` (null: none, i.e. ""
for the unconditional half), `seeds`, `steps`, `guidance`, `width`, `height`, `scheduler`
(sdgen's --scheduler name: "pndm": the folder's; "ddim", "euler", "euler-a", "dpm++2m":
`DDIMScheduler`, `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`,
`DPMSolverMultistepScheduler.from_config` of it; "dpm++2m-karras": the latter with
`use_karras_sigmas=True`), `key`, and for convenience `timesteps` (as the scheduler set them;
PNDM repeats its second), `init_noise_sigma` and `scheduler_config` (the effective config, class
included; non-finite floats, such as DPM-Solver's `lambda_min_clipped` of -inf, as the strings
"-inf", "inf", "nan"). The generators reach the scheduler too, as in diffusers: "euler-a" draws
each step's noise from image i's generator, after the initial noise.
pipeline.safetensors holds, per case:
- `<key>` [n,h,w,3]: the images in [0,1] (NHWC, the np output)
- `<key>_latents` [n,4,h/8,w/8]: the final latents, before `/ scaling_factor` and VAE decode
- `<key>_noise` [n,4,h/8,w/8]: the initial noise as drawn (per seed, `randn([1,4,h/8,w/8])`,
  concatenated), before the pipeline multiplies it by `init_noise_sigma`
Cases: pndm_basic (seed 42, 10 steps, cfg 7.5), pndm_negative (+ "blurry, low quality"), batch2
(seeds 7 and 8, 8 steps), ddim (seed 3, 12 steps), euler (seed 5, 12 steps, cfg 5.0), nonsquare
(64 wide x 80 high, latents 8 wide x 10 high, seed 11, 6 steps), guidance1 (cfg 1.0: no
unconditional pass, seed 13, 6 steps), euler_a (seed 21, 10 steps), dpmpp_2m (seed 22, 10
steps), dpmpp_2m_karras (seed 23, 10 steps), euler_a_batch2 (seeds 24 and 25, 10 steps). Prompt:
"a lighthouse at dusk".

Precision: image i of batch2 (and of euler_a_batch2) equals the n=1 run of seed `seeds[i]` only
to ~4e-6 (torch's CPU kernels round differently per batch size); the latents then differ by ~1e-4
(their std is ~10: random weights make them large). That is the float noise a faithful
re-implementation should expect on these pipeline references.

`png/<key>_<i>.png`: the images as uint8 `round(x * 255)` (diffusers' numpy_to_pil), to eyeball.
"""


def write_readme_section(section: str, begin: str = README_BEGIN, end: str = README_END) -> None:
    """Puts `section` between the `begin` and `end` markers of testdata/reference/README.md (every
    make_*.py script owns one such section), replacing what was there."""
    block = f"{begin}\n{section}{end}\n"
    if REF_README.exists():
        text = REF_README.read_text(encoding="utf-8")
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1].lstrip("\n")
            text = head + block + ("\n" + tail if tail else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        text = (
            "# Reference data\n\nGenerated by the `tools/reference/make_*.py` scripts (see "
            "tools/reference/README.md); tests read these files, so `cargo test` needs no Python.\n\n" + block
        )
    REF_README.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", help=f"path to {BPE_NAME} (default: installed open_clip, else pip download)")
    args = ap.parse_args()

    if importlib.util.find_spec("ftfy") is not None:
        raise SystemExit("ftfy is installed: uninstall it (pip uninstall -y ftfy); the references assume it is absent")
    setup_determinism()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab, merges = build_vocab(find_bpe(args.bpe, tmp))
        tok_dir = tmp / "tokenizer"
        write_tokenizer(tok_dir, vocab, merges)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tokenizer) == len(vocab), (len(tokenizer), len(vocab))
    assert tokenizer.model_max_length == 77
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (bos, eos, eos)
    # transformers' (tokenizers-backed) CLIPTokenizer must agree with openai's algorithm.
    texts = CLIP_PROMPTS + [c["prompt"] for c in PIPELINE_CASES] + [c["negative_prompt"] or "" for c in PIPELINE_CASES]
    for text in texts:
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == openai_encode(text, vocab, merges), f"tokenizers disagree on {text!r}"

    text_encoder = build_text_encoder(vocab)
    unet = build_unet()
    vae = build_vae()
    # from_config keeps clip_sample (not a PNDM argument), as loading the real folder does, so
    # DDIMScheduler.from_config(pipe.scheduler.config) gets clip_sample=False like SD 1.5's.
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
    assert scheduler.config.clip_sample is False
    for name, m in [("text_encoder", text_encoder), ("unet", unet), ("vae", vae)]:
        print(f"{name}: {nparams(m)} params ({nparams(m) * 4 / 1e6:.3f} MB f32)")

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    pipe.save_pretrained(MODEL_DIR, safe_serialization=True)
    # save_pretrained writes transformers' own tokenizer files; keep the hub's four instead.
    write_tokenizer(MODEL_DIR / "tokenizer", vocab, merges)
    # transformers 5 saves CLIPTextModel's keys without the "text_model." prefix that SD 1.5's own
    # file (and every transformers 4 save) has; restore the hub's names, plus the int64
    # `position_ids` buffer those files carry. from_pretrained below must load it back unchanged.
    te_file = MODEL_DIR / "text_encoder" / "model.safetensors"
    te = load_file(str(te_file))
    assert not any(k.startswith("text_model.") for k in te), "transformers saved the hub's names already"
    te = {f"text_model.{k}": v for k, v in te.items()}
    te["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    save_file(te, str(te_file), metadata={"format": "pt"})
    # ... and the hub's scheduler_config.json rather than one with every current key spelled out.
    (MODEL_DIR / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SD15_SCHEDULER_FILE, **SD15_SCHEDULER}, indent=2) + "\n", encoding="utf-8"
    )
    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    print(f"saved {MODEL_DIR.relative_to(REPO)}: {total / 1e6:.3f} MB")
    for f in sorted(MODEL_DIR.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(MODEL_DIR)} {f.stat().st_size}")

    # All references come from the folder as loaded back, so they describe the committed files.
    loaded = StableDiffusionPipeline.from_pretrained(MODEL_DIR, dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.safety_checker is None and loaded.feature_extractor is None
    for a, b in [(pipe.unet, loaded.unet), (pipe.vae, loaded.vae), (pipe.text_encoder, loaded.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert all(v.dtype == torch.float32 for v in sb.values())
    ids_a = pipe.tokenizer(CLIP_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    ids_b = loaded.tokenizer(CLIP_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids_a == ids_b, "the saved tokenizer tokenizes differently"

    REF_DIR.mkdir(parents=True, exist_ok=True)
    if (REF_DIR / "png").exists():
        shutil.rmtree(REF_DIR / "png")
    (REF_DIR / "png").mkdir()

    clip = make_clip(loaded)
    save_tensors(REF_DIR / "clip.safetensors", clip)
    save_tensors(REF_DIR / "unet.safetensors", make_unet(loaded, clip))
    save_tensors(REF_DIR / "vae.safetensors", make_vae(loaded))

    cases_json, tensors = [], {}
    print("pipeline cases:")
    for case in PIPELINE_CASES:
        res = run_case(loaded, case)
        check_case(loaded, case, res)
        mem = run_case(pipe, case)  # the in-memory pipeline must agree with the reloaded folder
        assert np.array_equal(mem["images"], res["images"]), f"{case['name']}: reload changed the images"
        image_stats(case["name"], res["images"])
        if len(case["seeds"]) > 1:
            # Image i of a batch must be image 0 of an n=1 run with seed seeds[i]. Not bit for bit:
            # torch's CPU GEMM/conv kernels round differently for different batch sizes (the UNet
            # sees 2n rows under CFG), so this is a tolerance check; the measured gap is printed.
            for i, s in enumerate(case["seeds"]):
                single = run_case(loaded, case, seeds=[s])
                img_gap = float(np.abs(single["images"][0] - res["images"][i]).max())
                lat_gap = float((single["latents"][0] - res["latents"][i]).abs().max())
                assert torch.equal(single["noise"][0], res["noise"][i])
                assert img_gap < BATCH_IMAGE_ATOL, f"{case['name']}: image {i} (seed {s}) differs from n=1 by {img_gap}"
                print(f"  {case['name']}: image {i} vs its n=1 run (seed {s}): max |d| image {img_gap:.2e}, latents {lat_gap:.2e}")
        key = case["name"]
        tensors[key] = torch.from_numpy(np.ascontiguousarray(res["images"]))
        tensors[f"{key}_latents"] = res["latents"]
        tensors[f"{key}_noise"] = res["noise"]
        numpy_to_png(res["images"], key)
        cases_json.append(
            {
                **case,
                "key": key,
                "timesteps": res["timesteps"],
                "init_noise_sigma": res["init_noise_sigma"],
                "scheduler_config": res["scheduler_config"],
            }
        )
    save_tensors(REF_DIR / "pipeline.safetensors", tensors)
    (REF_DIR / "pipeline.json").write_text(json.dumps(cases_json, indent=2, allow_nan=False) + "\n", encoding="utf-8")

    write_readme_section(
        README_SECTION.format(
            vocab_size=len(vocab),
            num_merges=NUM_MERGES,
            bos=bos,
            eos=eos,
            unet_ch=tuple(UNET_CONFIG["block_out_channels"]),
            unet_groups=UNET_CONFIG["norm_num_groups"],
            vae_ch=tuple(VAE_CONFIG["block_out_channels"]),
            vae_groups=VAE_CONFIG["norm_num_groups"],
        )
    )
    ref_total = sum(f.stat().st_size for f in REF_DIR.rglob("*") if f.is_file())
    print(f"wrote {REF_DIR.relative_to(REPO)}: {ref_total / 1e3:.1f} KB")


if __name__ == "__main__":
    main()
