#!/usr/bin/env python3
"""Builds the tiny random-weight SD 3.5 Large- and Medium-style pipelines and their diffusers
reference outputs.

Writes (relative to the repository root):
  testdata/tiny-sd35-large/     a StableDiffusion3Pipeline in the hub's layout (f32), its
                                transformer and text_encoder_3 sharded as the real repos' are
  testdata/tiny-sd35-medium/    the same encoders and VAE, a Medium-style (MMDiT-X) transformer
  testdata/reference/sd3/components.safetensors, pipeline.safetensors, pipeline.json
  testdata/reference/README.md  (only the section between the sd3 markers)

Needs testdata/tiny-t5/tokenizer_3 (make_t5.py: a real-format T5 tokenizer) and the CLIP BPE
merges (found as make_sd15.py finds them: --bpe PATH, an installed open_clip, or the
open_clip_torch wheel fetched alone with pip). Deterministic: seeded weights and inputs, one CPU
thread, torch.use_deterministic_algorithms(True). ftfy must not be installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import diffusers
import transformers
import PIL.Image
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from transformers import CLIPTokenizer, T5TokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd15 import CLIP_PROMPTS, save_tensors, setup_determinism, write_readme_section  # noqa: E402
from sd15_tiny import BPE_NAME, build_vocab, find_bpe, nparams, write_tokenizer  # noqa: E402
from sd3_tiny import (  # noqa: E402
    SD35_SCHEDULER,
    SEEDS,
    T5_CONFIG,
    TE1_HIDDEN,
    TE2_HIDDEN,
    TRANSFORMER_LARGE,
    TRANSFORMER_MEDIUM,
    build_text_encoder,
    build_text_encoder_2,
    build_text_encoder_3,
    build_transformer,
    build_vae,
)
from sdxl_tiny import write_tokenizer_2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LARGE_DIR = REPO / "testdata" / "tiny-sd35-large"
MEDIUM_DIR = REPO / "testdata" / "tiny-sd35-medium"
T5_TOKENIZER = REPO / "testdata" / "tiny-t5" / "tokenizer_3"
REF_DIR = REPO / "testdata" / "reference" / "sd3"
REF_README = REPO / "testdata" / "reference" / "README.md"
README_BEGIN, README_END = "<!-- sd3 begin -->", "<!-- sd3 end -->"

PROMPT = CLIP_PROMPTS[0]
NEG = "blurry, low quality"
# The sharded components of the real repos (stabilityai/stable-diffusion-3.5-large: transformer in
# 2 shards, text_encoder_3 in 2; -medium: text_encoder_3 only).
SHARD_BYTES = {"large": {"transformer": "200KB", "text_encoder_3": "200KB"}, "medium": {"text_encoder_3": "200KB"}}

CASES = [
    dict(name="large", model="large", negative_prompt=None, seeds=[42], steps=6, guidance=5.0, width=64, height=64),
    dict(name="large_negative", model="large", negative_prompt=NEG, seeds=[42], steps=6, guidance=5.0, width=64,
         height=64),
    dict(name="large_guidance1", model="large", negative_prompt=None, seeds=[13], steps=5, guidance=1.0, width=64,
         height=64),
    dict(name="large_batch2_nonsquare", model="large", negative_prompt=None, seeds=[7, 8], steps=5, guidance=4.0,
         width=96, height=64),
    dict(name="large_turbo", model="large", negative_prompt=None, seeds=[3], steps=4, guidance=0.0, width=64,
         height=64),
    dict(name="large_no_t5", model="large", negative_prompt=None, seeds=[42], steps=6, guidance=5.0, width=64,
         height=64, no_t5=True),
    dict(name="large_t5_77", model="large", negative_prompt=NEG, seeds=[5], steps=4, guidance=3.5, width=64,
         height=64, max_sequence_length=77),
    dict(name="medium", model="medium", negative_prompt=None, seeds=[42], steps=6, guidance=5.0, width=64, height=64),
    dict(name="medium_slg", model="medium", negative_prompt=None, seeds=[42], steps=10, guidance=5.0, width=64,
         height=64, skip_guidance_layers=[1]),
    # StableDiffusion3Img2ImgPipeline: 10 steps at 0.75 skip int(10 - 7.5) = 2 (SD 1.5's rule: 3).
    dict(name="large_img2img", model="large", negative_prompt=NEG, seeds=[42, 43], steps=10, guidance=5.0, width=64,
         height=64, init_image="../sd15/img2img_init.png", strength=0.75),
]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def save_folder(pipe, folder: Path, vocab, merges, shards: dict[str, str]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The hub's CLIP tokenizer files (no tokenizer.json); tokenizer_2 pads with "!".
    write_tokenizer(folder / "tokenizer", vocab, merges)
    write_tokenizer_2(folder / "tokenizer_2", vocab, merges)
    shutil.rmtree(folder / "tokenizer_3")
    shutil.copytree(T5_TOKENIZER, folder / "tokenizer_3")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD35_SCHEDULER, indent=2) + "\n")
    for component, size in shards.items():
        model = getattr(pipe, component)
        shutil.rmtree(folder / component)
        model.save_pretrained(folder / component, safe_serialization=True, max_shard_size=size)
        n = len(list((folder / component).glob("*.safetensors")))
        assert n >= 2, f"{component}: {n} shard(s)"
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"saved {folder.relative_to(REPO)}: {total / 1e6:.3f} MB")


def build(bpe: str | None):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab, merges = build_vocab(find_bpe(bpe, tmp))
        write_tokenizer(tmp / "tokenizer", vocab, merges)
        write_tokenizer_2(tmp / "tokenizer_2", vocab, merges)
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    tokenizer_3 = T5TokenizerFast.from_pretrained(T5_TOKENIZER)
    encoders = dict(
        text_encoder=build_text_encoder(vocab), text_encoder_2=build_text_encoder_2(vocab),
        text_encoder_3=build_text_encoder_3(len(tokenizer_3)), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
    )
    vae = build_vae()
    pipes = {}
    for name, config, folder in [("large", TRANSFORMER_LARGE, LARGE_DIR), ("medium", TRANSFORMER_MEDIUM, MEDIUM_DIR)]:
        transformer = build_transformer(config, name)
        print(f"{name} transformer: {nparams(transformer)} params")
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD35_SCHEDULER),
            **encoders,
        )
        save_folder(pipe, folder, vocab, merges, SHARD_BYTES[name])
        pipes[name] = pipe
    return pipes


def load(folder: Path, mem) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]:
        a, b = getattr(mem, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{folder.name} {name}: reload differs"
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    return pipe


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def components(pipe) -> dict[str, torch.Tensor]:
    """Each encoder's output for PROMPT and "", and one transformer forward on the pipeline's
    conditioning (the joint context and pooled text diffusers builds from them)."""
    out = {}
    for i, (tok, te) in enumerate([(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]):
        ids = tok([PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        o = te(ids, output_hidden_states=True)
        out[f"clip{i + 1}_ids"] = ids.to(torch.int64)
        out[f"clip{i + 1}_penultimate"] = o.hidden_states[-2]
        out[f"clip{i + 1}_text_embeds"] = o.text_embeds
    ids = pipe.tokenizer_3([PROMPT, ""], padding="max_length", max_length=256, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
    out["t5_ids"] = ids.to(torch.int64)
    out["t5_hidden"] = pipe.text_encoder_3(ids)[0]
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt="",
                                                         do_classifier_free_guidance=True, max_sequence_length=256)
    out["context"], out["pooled"] = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
    g = torch.Generator().manual_seed(77)
    latents = torch.randn((2, 16, 8, 12), generator=g)
    t = torch.tensor([1000.0, 500.0])
    out["transformer_latents"], out["transformer_timesteps"] = latents, t
    out["transformer_out"] = pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=out["context"],
                                              pooled_projections=out["pooled"], return_dict=False)[0]
    return out


class Recorder:
    """The timesteps run and the latents after the last step."""

    def __init__(self):
        self.timesteps, self.latents = [], None

    def __call__(self, _pipe, step, t, kwargs):
        assert step == len(self.timesteps)
        self.timesteps.append(float(t))
        self.latents = kwargs["latents"].clone()
        return kwargs


@torch.no_grad()
def run_case(pipes, case: dict) -> tuple[dict, dict]:
    pipe = pipes[case["model"]]
    if case.get("no_t5"):
        # diffusers' documented way to run without T5: zeros in its place.
        pipe = StableDiffusion3Pipeline.from_pipe(pipe, text_encoder_3=None, tokenizer_3=None)
    n, key = len(case["seeds"]), case["name"]
    gens = [torch.Generator("cpu").manual_seed(s) for s in case["seeds"]]
    noise = torch.cat([torch.randn((1, 16, case["height"] // 8, case["width"] // 8), generator=torch.Generator(
        "cpu").manual_seed(s)) for s in case["seeds"]])
    rec = Recorder()
    extra = {k: case[k] for k in ("max_sequence_length", "skip_guidance_layers") if k in case}
    if "init_image" in case:
        pipe = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
        # One copy per prompt: the pipeline encodes image[i] with generator[i].
        extra["image"] = [PIL.Image.open(REF_DIR / case["init_image"]).convert("RGB")] * n
        extra["strength"] = case["strength"]
    images = pipe(
        prompt=[PROMPT] * n, negative_prompt=None if case["negative_prompt"] is None else [case["negative_prompt"]] * n,
        num_inference_steps=case["steps"], guidance_scale=case["guidance"], width=case["width"],
        height=case["height"], generator=gens, output_type="np", callback_on_step_end=rec, **extra,
    ).images
    sched = pipe.scheduler
    info = {**case, "prompt": PROMPT, "timesteps": rec.timesteps, "sigmas": [float(s) for s in sched.sigmas]}
    tensors = {key: torch.from_numpy(np.ascontiguousarray(images)), f"{key}_latents": rec.latents,
               f"{key}_noise": noise}
    std = float(images.std())
    print(f"  {key}: {len(rec.timesteps)} steps, image std {std:.3f}")
    assert std > 0.05, f"{key}: images are too flat"
    return info, tensors


README_SECTION = """## sd3 (make_sd3.py)

`testdata/tiny-sd35-large/` and `testdata/tiny-sd35-medium/`: `StableDiffusion3Pipeline` folders
(f32, diffusers {diffusers_version}) with the real repos' layout: `transformer/` and
`text_encoder_3/` sharded (`*.safetensors.index.json`) in Large, `text_encoder_3/` in Medium;
SD 3.5's verbatim scheduler config (`FlowMatchEulerDiscreteScheduler`, shift 3.0). Encoders: CLIP-L
and CLIP-G both with projections (hidden {te1}/{te2}), T5 (width {t5}, tokenizer from
`testdata/tiny-t5/tokenizer_3`); transformer: {large}; Medium adds `dual_attention_layers`
{dual}. VAE: 16 latent channels, no quant convolutions, scaling 1.5305, shift 0.0609. Seeds:
{seeds}.

`components.safetensors`: for PROMPT and "" — `clip{{1,2}}_ids`, `clip{{1,2}}_penultimate`,
`clip{{1,2}}_text_embeds`, `t5_ids` (256), `t5_hidden`; `context`/`pooled`: what `encode_prompt`
gives for PROMPT with an empty negative, `[negative; positive]`; `transformer_out` for
`transformer_latents` `[2, 16, 8, 12]` at `transformer_timesteps` with that conditioning (Large).

`pipeline.safetensors` / `pipeline.json`: per case the images (`output_type="np"`), the latents
after the last step (`<case>_latents`), the initial noise each seed draws (`<case>_noise`), and in
the JSON the timesteps run and the scheduler's sigmas. Cases (prompt {prompt!r}):
{cases}
"""


def case_line(c: dict) -> str:
    keys = ("no_t5", "max_sequence_length", "skip_guidance_layers", "init_image", "strength")
    extra = "".join(f", {k} {c[k]}" for k in keys if k in c)
    neg = "no negative" if c["negative_prompt"] is None else f"negative {c['negative_prompt']!r}"
    return (f"- `{c['name']}` ({c['model']}, seeds {c['seeds']}, {c['steps']} steps, guidance {c['guidance']}, "
            f"{neg}, {c['width']}x{c['height']}{extra})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", help=f"path to {BPE_NAME} (default: installed open_clip, else pip download)")
    args = ap.parse_args()
    if importlib.util.find_spec("ftfy") is not None:
        raise SystemExit("ftfy is installed: uninstall it (pip uninstall -y ftfy); the references assume it is absent")
    if not (T5_TOKENIZER / "tokenizer.json").exists():
        raise SystemExit(f"{T5_TOKENIZER} is missing: run make_t5.py first")
    setup_determinism()
    diffusers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")

    mem = build(args.bpe)
    pipes = {"large": load(LARGE_DIR, mem["large"]), "medium": load(MEDIUM_DIR, mem["medium"])}
    REF_DIR.mkdir(parents=True, exist_ok=True)
    save_tensors(REF_DIR / "components.safetensors", components(pipes["large"]))
    cases, tensors = [], {}
    for case in CASES:
        info, t = run_case(pipes, case)
        cases.append(info)
        tensors.update(t)
    save_tensors(REF_DIR / "pipeline.safetensors", tensors)
    (REF_DIR / "pipeline.json").write_text(json.dumps(cases, indent=2) + "\n", encoding="utf-8")
    write_readme_section(begin=README_BEGIN, end=README_END, section=README_SECTION.format(
        diffusers_version=diffusers.__version__, te1=TE1_HIDDEN, te2=TE2_HIDDEN, t5=T5_CONFIG["d_model"],
        large=", ".join(f"{k} {v}" for k, v in TRANSFORMER_LARGE.items()),
        dual=TRANSFORMER_MEDIUM["dual_attention_layers"], seeds=", ".join(f"{k} {v}" for k, v in SEEDS.items()),
        prompt=PROMPT, cases="\n".join(case_line(c) for c in cases),
    ))
    size = sum(f.stat().st_size for f in REF_DIR.rglob("*") if f.is_file())
    print(f"wrote {REF_DIR.relative_to(REPO)}: {size / 1e3:.1f} KB")


if __name__ == "__main__":
    main()
