"""Full-size SD 1.5 parity on the GPU machine: diffusers builds SD 1.5 at its real sizes with
seeded random weights (the hub layout, bf16 safetensors, the real CLIP tokenizer from
testdata/clip-tokenizer), then generates with a CPU generator at 512x512.

  python3 sd15_fullsize.py make DIR          # writes the model folder
  python3 sd15_fullsize.py diffusers DIR     # diffusers' images (f32 and bf16) into $OUT
  python3 sd15_fullsize.py compare           # compares ours (PNGs in $OUT/ours-*) with diffusers'
"""
import json
import os
import sys
import time

import numpy as np
import torch

OUT = os.environ.get("OUT", "/tmp/out")
HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT, SEED, STEPS = "a lighthouse at dusk", 42, 20
SD15_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def make(model_dir):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    tok = CLIPTokenizer.from_pretrained(os.path.join(HERE, "../../testdata/clip-tokenizer"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    print("saved", model_dir, sum(p.numel() for m in (unet, vae, text) for p in m.parameters()) / 1e9, "B params")


def diffusers_images(model_dir):
    from diffusers import StableDiffusionPipeline
    res = {}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dt).to("cuda")
        kw = dict(num_inference_steps=STEPS, output_type="np", height=512, width=512)
        pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), num_inference_steps=2, output_type="np")  # warm-up
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t0 = time.time()
        img = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **kw).images[0]
        torch.cuda.synchronize()
        res[name] = {"seconds": round(time.time() - t0, 3), "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                     "mean": float(img.mean()), "std": float(img.std())}
        np.save(os.path.join(OUT, f"diffusers-{name}.npy"), img.astype(np.float32))
        del pipe; torch.cuda.empty_cache()
    print(json.dumps(res))
    json.dump(res, open(os.path.join(OUT, "diffusers.json"), "w"), indent=1)


def compare():
    from PIL import Image
    res = {}
    for name in ("f32", "bf16"):
        want = np.load(os.path.join(OUT, f"diffusers-{name}.npy"))
        d = os.path.join(OUT, f"ours-{name}")
        pngs = sorted(f for f in os.listdir(d) if f.endswith(".png")) if os.path.isdir(d) else []
        if not pngs:
            res[name] = "no image"; continue
        ours = np.asarray(Image.open(os.path.join(d, pngs[0])).convert("RGB")).astype(np.float32)
        diff = np.abs(ours - np.round(want * 255))
        res[name] = {"within_1_of_255_pct": round(float((diff <= 1).mean() * 100), 3), "mean_abs_of_255": round(float(diff.mean()), 3),
                     "max_abs_of_255": float(diff.max()), "ours_mean": float(ours.mean() / 255), "ref_mean": float(want.mean())}
    print(json.dumps(res))
    json.dump(res, open(os.path.join(OUT, "fullsize_compare.json"), "w"), indent=1)


if __name__ == "__main__":
    {"make": lambda: make(sys.argv[2]), "diffusers": lambda: diffusers_images(sys.argv[2]), "compare": compare}[sys.argv[1]]()
