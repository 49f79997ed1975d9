#!/usr/bin/env python3
"""Latent consistency and SDXL-Turbo references on the tiny models, from diffusers' pipelines.

Writes (relative to the repository root):
  testdata/tiny-sd15-lcm/                   the tiny SD 1.5 as an LCM-distilled folder, in the layout
                                            of SimianLuo/LCM_Dreamshaper_v7: a
                                            LatentConsistencyModelPipeline whose UNet has a guidance
                                            embedding (`time_cond_proj_dim` 256, its `cond_proj`
                                            seeded), LCMScheduler config as published
                                            (testdata/scheduler-configs/lcm-dreamshaper-v7.json),
                                            the other components symlinks to tiny-sd15's
  testdata/tiny-sdxl-lcm/                   the tiny SDXL with an LCM UNet (as latent-consistency/lcm-sdxl
                                            swapped into SDXL base: StableDiffusionXLPipeline, LCM
                                            scheduler), the other components symlinks to tiny-sdxl's
  testdata/tiny-sdxl-turbo/                 the tiny SDXL as stabilityai/sdxl-turbo's folder: its
                                            model_index.json and scheduler config, the components
                                            symlinks to tiny-sdxl's
  testdata/lora/sdxl_lcm.safetensors        a rank-4 LoRA for the tiny SDXL's UNet in the key format of
                                            latent-consistency/lcm-lora-sdxl: kohya's `lora_unet_…`
                                            with diffusers' module names (not SGM's), `.lora_down`,
                                            `.lora_up`, `.alpha`, over LCM-LoRA's targets (attention,
                                            projections, feed-forward, resnet convs and shortcuts,
                                            time projections, down/upsamplers)
  testdata/reference/lcm/pipelines.json     the cases
  testdata/reference/lcm/pipelines.safetensors  per case the images [n,h,w,3] (output_type="np")
  testdata/reference/lcm/png/<case>_<i>.png the images as 8-bit PNGs (for the CLI tests)

Cases, each as a user runs diffusers (`from_pretrained` of the folder; CPU, f32, one thread,
deterministic algorithms, `generator=[Generator("cpu").manual_seed(s) for s in seeds]`):
- sd15_lcm*: LatentConsistencyModelPipeline.from_pretrained(tiny-sd15-lcm), guidance embedded
  (w = guidance − 1), no CFG, the LCM scheduler re-noising between steps from the generators;
- sdxl_lcm_unet: StableDiffusionXLPipeline.from_pretrained(tiny-sdxl-lcm) (its `timestep_cond`
  path: guidance embedded, no CFG);
- sdxl_lcm_lora*: StableDiffusionXLPipeline.from_pretrained(tiny-sdxl) with
  `scheduler = LCMScheduler.from_config(scheduler.config)`, `load_lora_weights(file)` +
  `fuse_lora()`, guidance 1 (the `--quality lcm` settings: no CFG) and guidance 2 (CFG);
- sdxl_turbo*: StableDiffusionXLPipeline.from_pretrained(tiny-sdxl-turbo): the tiny SDXL with
  SDXL-Turbo's model_index scheduler class and scheduler config
  (testdata/scheduler-configs/sdxl-turbo.json: Euler ancestral, trailing spacing), guidance 0, 1
  and 4 steps.

Run after make_sd15.py and make_sdxl.py: /tmp/torchenv/bin/python tools/reference/make_lcm.py
(torch 2.15, diffusers 0.42.1, transformers 5.25)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_lora import gens, setup_determinism  # noqa: E402  (one copy of the runs' set-up)

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "testdata"
SD15_DIR = TESTDATA / "tiny-sd15"
SDXL_DIR = TESTDATA / "tiny-sdxl"
LCM_DIR = TESTDATA / "tiny-sd15-lcm"
TURBO_DIR = TESTDATA / "tiny-sdxl-turbo"
SDXL_LCM_DIR = TESTDATA / "tiny-sdxl-lcm"
LORA_FILE = TESTDATA / "lora" / "sdxl_lcm.safetensors"
REF_DIR = TESTDATA / "reference" / "lcm"
CONFIGS = TESTDATA / "scheduler-configs"
PROMPT = "a lighthouse at dusk"
TIME_COND_PROJ_DIM = 256  # LCM Dreamshaper v7's
RANK, ALPHA = 4, 2.0
# latent-consistency/lcm-lora-sdxl's targets (diffusers' train_lcm_distill_lora_sdxl.py defaults).
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]

CASES = [
    dict(name="sd15_lcm", model="sd15_lcm", seeds=[11, 12], steps=4, guidance=8.0),
    dict(name="sd15_lcm_2steps", model="sd15_lcm", seeds=[13], steps=2, guidance=3.0),
    dict(name="sdxl_lcm_unet", model="sdxl_lcm_unet", seeds=[41, 42], steps=4, guidance=8.0),
    dict(name="sdxl_lcm_lora", model="sdxl_lcm_lora", seeds=[21, 22], steps=4, guidance=1.0),
    dict(name="sdxl_lcm_lora_cfg", model="sdxl_lcm_lora", seeds=[23], steps=3, guidance=2.0),
    dict(name="sdxl_turbo", model="sdxl_turbo", seeds=[31, 32], steps=1, guidance=0.0),
    dict(name="sdxl_turbo_4steps", model="sdxl_turbo", seeds=[33], steps=4, guidance=0.0),
]
SCHEDULER = {"sd15_lcm": "lcm", "sdxl_lcm_unet": "lcm", "sdxl_lcm_lora": "lcm", "sdxl_turbo": "euler-a"}


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def lcm_unet(plain_dir: Path, seed: int) -> UNet2DConditionModel:
    """The UNet of `plain_dir` with a guidance embedding: the same weights plus a seeded
    `time_embedding.cond_proj` (`time_cond_proj_dim` 256, LCM Dreamshaper v7's and lcm-sdxl's)."""
    plain = UNet2DConditionModel.from_pretrained(plain_dir / "unet")
    unet = UNet2DConditionModel.from_config({**plain.config, "time_cond_proj_dim": TIME_COND_PROJ_DIM})
    missing, unexpected = unet.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = unet.time_embedding.cond_proj.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return unet


def make_lcm_folder(folder: Path, plain_dir: Path, pipeline_class: str, seed: int) -> None:
    """`plain_dir` as an LCM-distilled folder: an LCM UNet, the published LCM scheduler config,
    `pipeline_class` in model_index.json, the other components relative symlinks to `plain_dir`'s."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "scheduler").mkdir(parents=True)
    lcm_unet(plain_dir, seed).save_pretrained(folder / "unet")
    for f in (folder / "unet").iterdir():
        f.chmod(0o644)
    shutil.copy(CONFIGS / "lcm-dreamshaper-v7.json", folder / "scheduler" / "scheduler_config.json")
    index = json.loads((plain_dir / "model_index.json").read_text())
    index.update({"_class_name": pipeline_class, "scheduler": ["diffusers", "LCMScheduler"]})
    if pipeline_class.startswith("LatentConsistency"):
        index.pop("image_encoder", None)
    write_json(folder / "model_index.json", index)
    for part in sorted(index):
        if isinstance(index[part], list) and index[part][0] is not None and part not in ("unet", "scheduler"):
            (folder / part).symlink_to(Path("..") / plain_dir.name / part)


def make_lcm_lora(unet) -> None:
    """Random rank-4 matrices for every LCM-LoRA target module, kohya keys of diffusers' names."""
    g = torch.Generator().manual_seed(601)
    tensors = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not any(name == t or name.endswith("." + t) for t in LCM_LORA_TARGETS):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn((RANK, m.in_channels, *m.kernel_size), generator=g) * 0.06
            up = torch.randn((m.out_channels, RANK, 1, 1), generator=g) * 0.06
        else:
            down = torch.randn((RANK, m.in_features), generator=g) * 0.06
            up = torch.randn((m.out_features, RANK), generator=g) * 0.06
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(LORA_FILE))
    LORA_FILE.chmod(0o644)
    print(f"{LORA_FILE.name}: {len(tensors) // 3} modules")


def make_turbo_folder() -> None:
    """The tiny SDXL as an SDXL-Turbo folder: its own model_index.json (the scheduler class sdxl-turbo
    names) and scheduler config, every model component a relative symlink to tiny-sdxl's (the same
    weights, not a second copy)."""
    if TURBO_DIR.exists():
        shutil.rmtree(TURBO_DIR)
    (TURBO_DIR / "scheduler").mkdir(parents=True)
    shutil.copy(CONFIGS / "sdxl-turbo.json", TURBO_DIR / "scheduler" / "scheduler_config.json")
    # The pipeline loads the class model_index.json names (sdxl-turbo's names Euler ancestral).
    index = json.loads((SDXL_DIR / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    write_json(TURBO_DIR / "model_index.json", index)
    for part in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"]:
        (TURBO_DIR / part).symlink_to(Path("..") / SDXL_DIR.name / part)


def load(model: str):
    if model == "sd15_lcm":
        pipe = LatentConsistencyModelPipeline.from_pretrained(LCM_DIR, dtype=torch.float32)
        assert isinstance(pipe.scheduler, LCMScheduler)
    elif model == "sdxl_lcm_unet":
        pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_LCM_DIR, dtype=torch.float32, add_watermarker=False)
        assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == TIME_COND_PROJ_DIM
    elif model == "sdxl_lcm_lora":
        pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_DIR, dtype=torch.float32, add_watermarker=False)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        pipe.load_lora_weights(load_file(str(LORA_FILE)))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        changed = sum(not torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
        modules = len(load_file(str(LORA_FILE))) // 3
        # Every module of the LoRA fused (a weight each), nothing else touched.
        assert changed == modules, (changed, modules)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(TURBO_DIR, dtype=torch.float32, add_watermarker=False)
        assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
        assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def main() -> None:
    setup_determinism()
    make_lcm_folder(LCM_DIR, SD15_DIR, "LatentConsistencyModelPipeline", 501)
    make_lcm_folder(SDXL_LCM_DIR, SDXL_DIR, "StableDiffusionXLPipeline", 502)
    REF_DIR.mkdir(parents=True, exist_ok=True)
    (REF_DIR / "png").mkdir(exist_ok=True)
    make_lcm_lora(UNet2DConditionModel.from_pretrained(SDXL_DIR / "unet"))
    tensors, cases, pipes = {}, [], {}
    make_turbo_folder()
    for case in CASES:
        model = case["model"]
        if model not in pipes:
            pipes[model] = load(model)
        pipe = pipes[model]
        n = len(case["seeds"])
        images = pipe(prompt=[PROMPT] * n, num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                      width=64, height=64, generator=gens(case["seeds"]), output_type="np").images
        tensors[case["name"]] = torch.from_numpy(images).float()
        for i, im in enumerate((images * 255).round().astype("uint8")):
            Image.fromarray(im).save(REF_DIR / "png" / f"{case['name']}_{i}.png")
        cases.append(dict(case, prompt=PROMPT, width=64, height=64, scheduler=SCHEDULER[model]))
        print(case["name"], images.shape, f"mean {images.mean():.4f}")
    # The LoRA and the guidance embedding change the images (else the tests prove nothing).
    plain = StableDiffusionXLPipeline.from_pretrained(SDXL_DIR, dtype=torch.float32, add_watermarker=False)
    plain.scheduler = LCMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    no_lora = plain(prompt=[PROMPT] * 2, num_inference_steps=4, guidance_scale=1.0, width=64, height=64,
                    generator=gens([21, 22]), output_type="np").images
    diff = (torch.from_numpy(no_lora) - tensors["sdxl_lcm_lora"]).abs().max().item()
    print(f"the LCM-LoRA moves the image by up to {diff * 255:.1f}/255")
    assert diff > 10 / 255
    other_w = pipes["sd15_lcm"](prompt=[PROMPT], num_inference_steps=4, guidance_scale=2.0, width=64, height=64,
                                generator=gens([11]), output_type="np").images
    diff = (torch.from_numpy(other_w) - tensors["sd15_lcm"][:1]).abs().max().item()
    print(f"guidance 8 vs 2 through the embedding: up to {diff * 255:.1f}/255")
    assert diff > 5 / 255
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(REF_DIR / "pipelines.safetensors"))
    (REF_DIR / "pipelines.safetensors").chmod(0o644)
    (REF_DIR / "pipelines.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
