"""Full-size SDXL base parity on the GPU machine: diffusers builds SDXL base at its real sizes with
seeded random weights from the real configs (the hub files bundled in
crates/sdgen/src/loading/single_file/sdxl/), saves the folder in the hub's layout (bf16
safetensors, the four tokenizer files with tokenizer_2 padding with "!", `text_model.`-prefixed
text encoder names), then generates with a CPU generator at 1024x1024.

  python3 sdxl_fullsize.py make DIR          # writes the model folder
  python3 sdxl_fullsize.py diffusers DIR     # diffusers' images (DTYPES, default bf16) into $OUT
  python3 sdxl_fullsize.py compare           # compares ours ($OUT/ours-*/*.png) with diffusers'

Environment: OUT (default /tmp/out); DTYPES ("bf16", or "f32 bf16"); DEVICE (cuda); SIDE (1024)
and STEPS (30), smaller only for a smoke test on a CPU.
"""
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

OUT = os.environ.get("OUT", "/tmp/out")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "../.."))
CONFIGS = os.path.join(REPO, "crates/sdgen/src/loading/single_file/sdxl")
CLIP_TOKENIZER = os.path.join(REPO, "testdata/clip-tokenizer")
DEVICE = os.environ.get("DEVICE", "cuda")
DTYPES = os.environ.get("DTYPES", "bf16").split()
PROMPT, SEED, GUIDANCE = "a lighthouse at dusk", 42, 5.0
SIDE, STEPS = int(os.environ.get("SIDE", "1024")), int(os.environ.get("STEPS", "30"))
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def config(component, file="config.json"):
    with open(os.path.join(CONFIGS, component, file)) as f:
        return json.load(f)


def hub_tokenizer(dst, component):
    """The hub's four files: the shared CLIP vocab.json/merges.txt and the component's own two
    config files (tokenizer_2's pad with "!"). No tokenizer.json, as on the hub."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(CLIP_TOKENIZER, f), dst)
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(CONFIGS, component, f), dst)


def patch_hub_files(model_dir):
    """Rewrites what a current save_pretrained writes differently from stabilityai's folder."""
    from safetensors.torch import load_file, save_file
    # transformers 5 saves only tokenizer.json and its own tokenizer_config.json.
    for component in ("tokenizer", "tokenizer_2"):
        hub_tokenizer(os.path.join(model_dir, component), component)
    # transformers 5 saves CLIPTextModel without the hub's "text_model." prefix
    # (CLIPTextModelWithProjection keeps it): rename, as make_sdxl.py does.
    for component in ("text_encoder", "text_encoder_2"):
        path = os.path.join(model_dir, component, "model.safetensors")
        sd = load_file(path)
        if not any(k.startswith("text_model.") for k in sd):
            sd = {k if k == "text_projection.weight" else f"text_model.{k}": v for k, v in sd.items()}
            save_file(sd, path, metadata={"format": "pt"})
            sd = load_file(path)
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in sd), component
        assert ("text_projection.weight" in sd) == (component == "text_encoder_2"), component
    # The hub's configs verbatim (the same bytes our binary bundles), so both sides read them.
    shutil.copy(os.path.join(CONFIGS, "model_index.json"), model_dir)
    for component, file in (("scheduler", "scheduler_config.json"), ("text_encoder", "config.json"),
                            ("text_encoder_2", "config.json"), ("unet", "config.json"), ("vae", "config.json")):
        shutil.copy(os.path.join(CONFIGS, component, file), os.path.join(model_dir, component, file))


def make(model_dir):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    t0 = time.time()
    torch.manual_seed(0)
    te_cfg = CLIPTextConfig.from_json_file(os.path.join(CONFIGS, "text_encoder", "config.json"))
    te2_cfg = CLIPTextConfig.from_json_file(os.path.join(CONFIGS, "text_encoder_2", "config.json"))
    # Built on the GPU: drawing 3.5B parameters on the host takes minutes.
    with torch.device(DEVICE):
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        text = CLIPTextModel(te_cfg)
        text_2 = CLIPTextModelWithProjection(te2_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for component in ("tokenizer", "tokenizer_2"):
            hub_tokenizer(os.path.join(tmp, component), component)
        tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"))
        tok_2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer_2"))
    assert tok.pad_token == "<|endoftext|>" and tok_2.pad_token == "!" and tok_2.pad_token_id == 0
    scheduler = EulerDiscreteScheduler.from_config(config("scheduler", "scheduler_config.json"))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text), ("text_encoder_2", text_2))}
    del pipe, unet, vae, text, text_2
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    patch_hub_files(model_dir)
    # Marks a finished folder, so a rerun on the same machine can skip this step.
    open(os.path.join(model_dir, ".made"), "w").close()
    print("saved", model_dir, {k: round(v / 1e9, 3) for k, v in params.items()}, "B params,",
          round(time.time() - t0, 1), "s")


def diffusers_images(model_dir):
    from diffusers import StableDiffusionXLPipeline
    res = {}
    for name in DTYPES:
        t0 = time.time()
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=TORCH_DTYPES[name],
                                                         add_watermarker=False).to(DEVICE)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.time() - t0
        kw = dict(guidance_scale=GUIDANCE, output_type="np", height=SIDE, width=SIDE)
        gen = lambda: torch.Generator("cpu").manual_seed(SEED)
        pipe(PROMPT, generator=gen(), num_inference_steps=2, **kw)  # warm-up
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        img = pipe(PROMPT, generator=gen(), num_inference_steps=STEPS, **kw).images[0]
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        res[name] = {"seconds": round(time.time() - t0, 3), "load_seconds": round(load_s, 2),
                     "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEVICE == "cuda" else None,
                     "mean": float(np.nanmean(img)), "std": float(np.nanstd(img)),
                     "nan_pct": round(float(np.isnan(img).mean() * 100), 3)}
        np.save(os.path.join(OUT, f"diffusers-{name}.npy"), img.astype(np.float32))
        del pipe
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(res))
    with open(os.path.join(OUT, "diffusers.json"), "w") as f:
        json.dump(res, f, indent=1)


def compare():
    """Per dtype: the fraction of channel values within 1/255 of diffusers' (rounded as PIL
    would), the mean and max difference in 1/255 units, and how much of diffusers' image is
    saturated (0 or 255): a random-weight image that is mostly saturated compares too easily.
    Writes $OUT/sdxl_fullsize.json (diffusers', ours and the comparison) and diffusers' images as
    PNGs for the archive."""
    from PIL import Image
    res = {}
    for name in DTYPES:
        path = os.path.join(OUT, f"diffusers-{name}.npy")
        if not os.path.exists(path):
            res[name] = "no diffusers image"
            continue
        want = np.round(np.nan_to_num(np.load(path), nan=0.0).clip(0, 1) * 255)
        Image.fromarray(want.astype(np.uint8)).save(os.path.join(OUT, f"diffusers-{name}.png"))
        pngs = sorted(glob.glob(os.path.join(OUT, f"ours-{name}", "*.png")))
        if not pngs:
            res[name] = "no image of ours"
            continue
        ours = np.asarray(Image.open(pngs[0]).convert("RGB")).astype(np.float32)
        if ours.shape != want.shape:
            res[name] = f"ours is {ours.shape}, diffusers' {want.shape}"
            continue
        diff = np.abs(ours - want)
        res[name] = {"within_1_of_255_pct": round(float((diff <= 1).mean() * 100), 3),
                     "mean_abs_of_255": round(float(diff.mean()), 3), "max_abs_of_255": float(diff.max()),
                     "ours_mean": float(ours.mean() / 255), "ref_mean": float(want.mean() / 255),
                     "ref_saturated_pct": round(float(((want == 0) | (want == 255)).mean() * 100), 3)}
    print(json.dumps(res))
    summary = {"compare": res, "prompt": PROMPT, "seed": SEED, "steps": STEPS, "side": SIDE, "guidance": GUIDANCE}
    for key, path in [("diffusers", os.path.join(OUT, "diffusers.json"))] + \
            [(f"ours_{n}", os.path.join(OUT, f"ours-{n}.json")) for n in DTYPES]:
        try:
            with open(path) as f:
                summary[key] = json.load(f)
        except (OSError, ValueError) as e:  # a failed run leaves an empty file
            summary[key] = f"no result: {e}"
    with open(os.path.join(OUT, "sdxl_fullsize.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    {"make": lambda: make(sys.argv[2]), "diffusers": lambda: diffusers_images(sys.argv[2]), "compare": compare}[sys.argv[1]]()
