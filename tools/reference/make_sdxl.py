#!/usr/bin/env python3
"""Builds the tiny random-weight SDXL base and refiner and their diffusers reference outputs.

Writes (relative to the repository root):
  testdata/tiny-sdxl/                 a StableDiffusionXLPipeline saved in the hub's layout (f32)
  testdata/tiny-sdxl-refiner/         a StableDiffusionXLImg2ImgPipeline (the refiner) likewise
  testdata/reference/sdxl/*.safetensors, pipeline.json, png/
  testdata/reference/README.md        (only the section between the sdxl markers)

Everything is deterministic: seeded weights, seeded inputs, one CPU thread and
torch.use_deterministic_algorithms(True); re-running gives byte-identical files
(with the pinned versions of tools/reference/requirements.txt).

The models are built by sdxl_tiny.py (vocabulary, reinit and the VAE layout come from
sd15_tiny.py; the BPE merges file is found as make_sd15.py finds it: --bpe PATH, an installed
open_clip, or the open_clip_torch wheel fetched alone with pip). ftfy must not be installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd15 import CLIP_PROMPTS, save_tensors, seeded_randn, setup_determinism, write_readme_section  # noqa: E402
from sd15_tiny import BPE_NAME, build_vocab, find_bpe, nparams, openai_encode, write_tokenizer  # noqa: E402
from sdxl_tiny import (  # noqa: E402
    ADD_TIME_DIM,
    BASE_UNET_CONFIG,
    REFINER_UNET_CONFIG,
    SDXL_SCHEDULER,
    SDXL_SCHEDULER_FILE,
    SDXL_VAE_CONFIG,
    SEEDS,
    TE1_HIDDEN,
    TE2_HIDDEN,
    TE2_PROJECTION,
    build_text_encoder,
    build_text_encoder_2,
    build_unet,
    build_vae,
    write_tokenizer_2,
)

REPO = Path(__file__).resolve().parents[2]
BASE_DIR = REPO / "testdata" / "tiny-sdxl"
REFINER_DIR = REPO / "testdata" / "tiny-sdxl-refiner"
REF_DIR = REPO / "testdata" / "reference" / "sdxl"
REF_README = REPO / "testdata" / "reference" / "README.md"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def patch_hub_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Rewrites what a current save_pretrained writes differently from the hub's SDXL folders."""
    # The hub's four tokenizer files (no tokenizer.json); tokenizer_2 pads with "!".
    if (folder / "tokenizer").exists():
        write_tokenizer(folder / "tokenizer", vocab, merges)
    write_tokenizer_2(folder / "tokenizer_2", vocab, merges)
    # transformers 5 saves CLIPTextModel without the "text_model." prefix the hub's file has
    # (CLIPTextModelWithProjection keeps it). SDXL's files were saved by transformers 4.32, after
    # position_ids became a non-persistent buffer, so (unlike SD 1.5's) they have no position_ids.
    te_file = folder / "text_encoder" / "model.safetensors"
    if te_file.exists():
        te = load_file(str(te_file))
        assert not any(k.startswith("text_model.") for k in te), "transformers saved the hub's names already"
        save_file({f"text_model.{k}": v for k, v in te.items()}, str(te_file), metadata={"format": "pt"})
    te2 = load_file(str(folder / "text_encoder_2" / "model.safetensors"))
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in te2), sorted(te2)
    assert "text_projection.weight" in te2 and not any("position_ids" in k for k in te2)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SDXL_SCHEDULER_FILE, **SDXL_SCHEDULER}, indent=2) + "\n", encoding="utf-8"
    )


def save_folder(pipe, folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    patch_hub_files(folder, vocab, merges)
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"saved {folder.relative_to(REPO)}: {total / 1e6:.3f} MB")
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(folder)} {f.stat().st_size}")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def build_models(bpe: str | None):
    """Builds both pipelines in memory and saves them; returns (base, refiner, vocab, merges)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab, merges = build_vocab(find_bpe(bpe, tmp))
        write_tokenizer(tmp / "tokenizer", vocab, merges)
        write_tokenizer_2(tmp / "tokenizer_2", vocab, merges)
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    bos, eos, bang = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["!"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (bos, eos, eos)
    assert (tokenizer_2.bos_token_id, tokenizer_2.eos_token_id, tokenizer_2.pad_token_id) == (bos, eos, bang)
    assert bang == 0 and len(tokenizer) == len(vocab) and len(tokenizer_2) == len(vocab)

    text_encoder = build_text_encoder(vocab)
    text_encoder_2 = build_text_encoder_2(vocab)
    unet = build_unet(BASE_UNET_CONFIG, "unet")
    refiner_unet = build_unet(REFINER_UNET_CONFIG, "refiner_unet")
    vae = build_vae()
    scheduler = EulerDiscreteScheduler.from_config({**SDXL_SCHEDULER_FILE, **SDXL_SCHEDULER})
    for name, m in [("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("unet", unet),
                    ("refiner unet", refiner_unet), ("vae", vae)]:
        print(f"{name}: {nparams(m)} params ({nparams(m) * 4 / 1e6:.3f} MB f32)")

    # add_watermarker=False: left at None, diffusers watermarks the images whenever the
    # `invisible-watermark` package happens to be installed (it is not a diffusers dependency).
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=refiner_unet, scheduler=EulerDiscreteScheduler.from_config(scheduler.config),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    save_folder(base, BASE_DIR, vocab, merges)
    save_folder(refiner, REFINER_DIR, vocab, merges)
    return base, refiner, vocab, merges


def load_folders(base_mem, refiner_mem):
    """The folders as loaded back; everything below describes the committed files."""
    base = StableDiffusionXLPipeline.from_pretrained(BASE_DIR, dtype=torch.float32, add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(REFINER_DIR, dtype=torch.float32, add_watermarker=False)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
    assert base.config.force_zeros_for_empty_prompt is True
    assert refiner.config.force_zeros_for_empty_prompt is False and refiner.config.requires_aesthetics_score is True
    assert refiner.text_encoder is None and refiner.tokenizer is None
    for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:
        a, b = getattr(base_mem, name), getattr(base, name)
        assert same_weights(a, b), f"base {name}: reload changed the weights"
        assert all(v.dtype == torch.float32 for v in b.state_dict().values())
    for name in ["unet", "vae", "text_encoder_2"]:
        assert same_weights(getattr(refiner_mem, name), getattr(refiner, name)), f"refiner {name}: reload differs"
    # The refiner shares the base's bigG text encoder and the VAE, weight for weight.
    assert same_weights(base.text_encoder_2, refiner.text_encoder_2)
    assert same_weights(base.vae, refiner.vae)
    assert isinstance(base.scheduler, EulerDiscreteScheduler) and base.scheduler.config.timestep_spacing == "leading"
    assert base.vae.config.force_upcast is True and base.vae.config.scaling_factor == 0.13025
    for tok_mem, tok in [(base_mem.tokenizer, base.tokenizer), (base_mem.tokenizer_2, base.tokenizer_2),
                         (base_mem.tokenizer_2, refiner.tokenizer_2)]:
        kw = dict(padding="max_length", max_length=77, truncation=True)
        assert tok_mem(CLIP_PROMPTS, **kw).input_ids == tok(CLIP_PROMPTS, **kw).input_ids
    return base, refiner


# ---------------------------------------------------------------------------------------------
# Text encoders and UNets
# ---------------------------------------------------------------------------------------------

PROMPT = CLIP_PROMPTS[0]
TOKENIZE = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")


def check_ids(tokenizer, texts: list[str], vocab, merges, pad_id: int) -> None:
    """transformers' ids == openai's BPE with the pipeline framing, padding with `pad_id`.

    tokenizer_2 makes "!" (its pad token) an added token, matched in the raw text before BPE, so
    "sofa!!" gives "sofa" + "!" + "!" where openai's BPE gives "sofa</w>" + "!!</w>"-pieces: those
    texts are compared per piece instead (see make_tokens.py for the full story)."""
    for text in texts:
        ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        if "!" in text and pad_id == vocab["!"]:
            pieces = text.split("!")
            expect = [vocab["<|startoftext|>"]]
            for i, piece in enumerate(pieces):
                expect += [t for t in openai_encode(piece, vocab, merges, 10**6)[1:] if t != vocab["<|endoftext|>"]]
                if i < len(pieces) - 1:
                    expect.append(vocab["!"])
            expect = expect[:76] + [vocab["<|endoftext|>"]]
        else:
            expect = openai_encode(text, vocab, merges)
            expect = expect[: expect.index(vocab["<|endoftext|>"]) + 1]
        expect += [pad_id] * (77 - len(expect))
        assert ids == expect, f"tokenizers disagree on {text!r}:\n{ids}\n{expect}"


@torch.no_grad()
def make_text_encoders(base, refiner) -> dict[str, torch.Tensor]:
    ids1 = base.tokenizer(CLIP_PROMPTS, **TOKENIZE).input_ids.to(torch.int64)
    ids2 = base.tokenizer_2(CLIP_PROMPTS, **TOKENIZE).input_ids.to(torch.int64)
    out1 = base.text_encoder(ids1, output_hidden_states=True)
    out2 = base.text_encoder_2(ids2, output_hidden_states=True)
    pooled2 = base.text_encoder_2.text_model(ids2).pooler_output
    eos = base.tokenizer.eos_token_id
    for ids, pooled, last in [(ids1, out1.pooler_output, out1.last_hidden_state), (ids2, pooled2, out2.last_hidden_state)]:
        first_eos = (ids == eos).int().argmax(dim=-1)
        assert torch.equal(first_eos, ids.argmax(dim=-1)), "pooling rules disagree"
        assert torch.equal(pooled, last[torch.arange(2), first_eos])
    assert torch.allclose(out2.text_embeds, pooled2 @ base.text_encoder_2.text_projection.weight.T, atol=1e-6)
    print(f"text encoders: ids1[1][-3:]={ids1[1, -3:].tolist()} ids2[0][:14]={ids2[0, :14].tolist()}")

    def encode(pipe, negative_prompt):
        return pipe.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt=negative_prompt)

    pe, npe_none, pooled, npooled_none = encode(base, None)
    pe2, npe_empty, pooled2_, npooled_empty = encode(base, "")
    assert torch.equal(pe, pe2) and torch.equal(pooled, pooled2_)
    # prompt_embeds = concat(te1 penultimate, te2 penultimate) along features; pooled = te2's
    # projection. Compared with batch-1 runs (torch's CPU kernels round differently per batch size).
    one1 = base.text_encoder(ids1[:1], output_hidden_states=True)
    one2 = base.text_encoder_2(ids2[:1], output_hidden_states=True)
    assert torch.equal(pe, torch.cat([one1.hidden_states[-2], one2.hidden_states[-2]], dim=-1))
    assert torch.equal(pooled, one2.text_embeds)
    gap = max(float((one1.hidden_states[-2] - out1.hidden_states[-2][:1]).abs().max()),
              float((one2.hidden_states[-2] - out2.hidden_states[-2][:1]).abs().max()),
              float((one2.text_embeds - out2.text_embeds[:1]).abs().max()))
    print(f"text encoders: batch-1 vs batch-2 rows differ by {gap:.2e}")
    assert gap < 1e-5
    # force_zeros_for_empty_prompt (true for the base): no negative prompt -> zeros, not "" encoded.
    assert not npe_none.any() and not npooled_none.any()
    assert npe_empty.std() > 0.1 and npooled_empty.std() > 0.1
    # The refiner has no text_encoder: its embeddings are te2's alone, and (force_zeros false) a
    # missing negative prompt is "" encoded.
    rpe, rnpe, rpooled, rnpooled = encode(refiner, None)
    assert torch.equal(rpe, one2.hidden_states[-2]) and torch.equal(rpooled, pooled)
    assert torch.equal(rnpe, npe_empty[..., -rnpe.shape[-1]:]) and torch.equal(rnpooled, npooled_empty)
    empty1 = base.tokenizer([""], **TOKENIZE).input_ids.to(torch.int64)
    empty2 = base.tokenizer_2([""], **TOKENIZE).input_ids.to(torch.int64)
    return {
        "input_ids_1": ids1,
        "input_ids_2": ids2,
        "te1_penultimate": out1.hidden_states[-2],
        "te2_penultimate": out2.hidden_states[-2],
        "te2_pooled": pooled2,
        "te2_text_embeds": out2.text_embeds,
        "empty_input_ids_1": empty1,
        "empty_input_ids_2": empty2,
        "prompt_embeds": pe,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds_none": npe_none,
        "negative_pooled_none": npooled_none,
        "negative_prompt_embeds_empty": npe_empty,
        "negative_pooled_empty": npooled_empty,
        "refiner_prompt_embeds": rpe,
        "refiner_negative_prompt_embeds_none": rnpe,
    }


def unet_forward(unet, sample, timestep, ehs, text_embeds, time_ids) -> dict[str, torch.Tensor]:
    """UNet output plus the added conditioning as diffusers builds it, captured by hooks:
    add_embeds = concat(text_embeds, add_time_proj(time_ids.flatten()).reshape(B, -1)) and
    emb = time_embedding(timestep) + add_embedding(add_embeds)."""
    seen = {}
    hooks = [
        unet.add_embedding.register_forward_hook(lambda m, a, o: seen.update(add_embeds=a[0], aug_emb=o)),
        unet.time_embedding.register_forward_hook(lambda m, a, o: seen.update(time_emb=o)),
    ]
    try:
        out = unet(sample, timestep, encoder_hidden_states=ehs,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    finally:
        for h in hooks:
            h.remove()
    n = sample.shape[0]
    tproj = unet.add_time_proj(time_ids.flatten()).reshape(n, -1)
    assert torch.equal(seen["add_embeds"], torch.cat([text_embeds, tproj], dim=-1))
    return {"out": out, "add_embeds": seen["add_embeds"], "emb": seen["time_emb"] + seen["aug_emb"]}


@torch.no_grad()
def make_unet(base, te: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sample = seeded_randn((2, 4, 8, 8), 501)
    timestep = torch.tensor([801.0], dtype=torch.float32)
    ehs = torch.cat([te["te1_penultimate"], te["te2_penultimate"]], dim=-1)
    text_embeds = te["te2_text_embeds"]
    # (original h, w, crop top, crop left, target h, w): the pipeline default for 64x64, and a
    # 1024x768 original cropped at (32, 16) rendered 64 high x 80 wide (large, varied values).
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64], [1024, 768, 32, 16, 64, 80]], dtype=torch.float32)
    res = unet_forward(base.unet, sample, timestep, ehs, text_embeds, time_ids)
    odd_sample = seeded_randn((1, 4, 8, 10), 502)
    odd_timestep = torch.tensor([537.25], dtype=torch.float32)
    odd_time_ids = torch.tensor([[64, 80, 0, 0, 64, 80]], dtype=torch.float32)
    odd = unet_forward(base.unet, odd_sample, odd_timestep, ehs[1:2], text_embeds[1:2], odd_time_ids)
    print(f"unet: out std {res['out'].std():.4f}, odd_out std {odd['out'].std():.4f}")
    return {
        "sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "text_embeds": text_embeds,
        "time_ids": time_ids, "add_embeds": res["add_embeds"], "emb": res["emb"], "out": res["out"],
        "odd_sample": odd_sample, "odd_timestep": odd_timestep, "odd_encoder_hidden_states": ehs[1:2],
        "odd_text_embeds": text_embeds[1:2], "odd_time_ids": odd_time_ids, "odd_out": odd["out"],
    }


@torch.no_grad()
def make_refiner_unet(refiner, te: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sample = seeded_randn((2, 4, 8, 8), 503)
    timestep = torch.tensor([181.0], dtype=torch.float32)
    ehs = te["te2_penultimate"]
    text_embeds = te["te2_text_embeds"]
    # (original h, w, crop top, crop left, aesthetic score): the pipeline's positive default for
    # 64x64 (score 6.0) and its negative default score 2.5 with another size and crop.
    time_ids = torch.tensor([[64, 64, 0, 0, 6.0], [1024, 768, 32, 16, 2.5]], dtype=torch.float32)
    res = unet_forward(refiner.unet, sample, timestep, ehs, text_embeds, time_ids)
    odd_sample = seeded_randn((1, 4, 8, 10), 504)
    odd_timestep = torch.tensor([63.5], dtype=torch.float32)
    odd_time_ids = torch.tensor([[64, 80, 0, 0, 6.0]], dtype=torch.float32)
    odd = unet_forward(refiner.unet, odd_sample, odd_timestep, ehs[1:2], text_embeds[1:2], odd_time_ids)
    print(f"refiner unet: out std {res['out'].std():.4f}, odd_out std {odd['out'].std():.4f}")
    return {
        "sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "text_embeds": text_embeds,
        "time_ids": time_ids, "add_embeds": res["add_embeds"], "emb": res["emb"], "out": res["out"],
        "odd_sample": odd_sample, "odd_timestep": odd_timestep, "odd_encoder_hidden_states": ehs[1:2],
        "odd_text_embeds": text_embeds[1:2], "odd_time_ids": odd_time_ids, "odd_out": odd["out"],
    }


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

NEG = "blurry, low quality"
PIPELINE_CASES = [
    dict(name="base", kind="base", negative_prompt=None, seeds=[42], steps=8, width=64, height=64),
    dict(name="base_negative", kind="base", negative_prompt=NEG, seeds=[42], steps=8, width=64, height=64),
    dict(name="base_empty_negative", kind="base", negative_prompt="", seeds=[42], steps=8, width=64, height=64),
    dict(name="base_batch2_nonsquare", kind="base", negative_prompt=None, seeds=[7, 8], steps=6, width=64,
         height=80),
    dict(name="base_guidance1", kind="base", negative_prompt=None, seeds=[13], steps=6, width=64, height=64,
         guidance=1.0),
    dict(name="ensemble", kind="base+refiner", negative_prompt=None, seeds=[42], steps=10, width=64, height=64,
         denoising_end=0.8, denoising_start=0.8),
    dict(name="ensemble_negative", kind="base+refiner", negative_prompt=NEG, seeds=[21], steps=10, width=64,
         height=64, denoising_end=0.8, denoising_start=0.8),
    dict(name="refiner_img2img", kind="refiner_img2img", negative_prompt=None, seeds=[51], steps=10, width=64,
         height=64, strength=0.3, init_image="refiner_init.png"),
    dict(name="refiner_img2img_negative_batch2", kind="refiner_img2img", negative_prompt=NEG, seeds=[52, 53],
         steps=10, width=64, height=64, strength=0.3, init_image="refiner_init.png"),
]
for _c in PIPELINE_CASES:
    _c.setdefault("guidance", 5.0)
    _c.update(prompt=PROMPT, scheduler="euler")
# The refiner's pipeline defaults, passed explicitly (the json records them).
AESTHETIC = dict(aesthetic_score=6.0, negative_aesthetic_score=2.5)
# How far image i of a batch may be from the same seed's n=1 image (see make_sd15.py).
BATCH_IMAGE_ATOL = 1e-4


def scheduler_json(sched) -> dict:
    cfg = {"class": type(sched).__name__}
    cfg.update({k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in sched.config.items() if not k.startswith("_")})
    return cfg


class Recorder:
    """Hooks on a pipeline: the latents after each step, the timesteps run, the UNet's added
    conditioning (first call) and the scheduler's add_noise arguments (img2img)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.steps: list[float] = []
        self.latents = None
        self.cond = None
        self.add_noise = None
        self._hook = pipe.unet.register_forward_pre_hook(self._pre, with_kwargs=True)
        self._orig_add_noise = pipe.scheduler.add_noise
        pipe.scheduler.add_noise = self._add_noise

    def _pre(self, _m, args, kwargs):
        if self.cond is None:
            self.cond = {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}
            self.cond["encoder_hidden_states"] = kwargs["encoder_hidden_states"].clone()

    def _add_noise(self, original, noise, timesteps):
        out = self._orig_add_noise(original, noise, timesteps)
        self.add_noise = dict(original=original.clone(), noise=noise.clone(), timesteps=timesteps.clone(), out=out)
        return out

    def on_step_end(self, _pipe, step, t, kwargs):
        assert step == len(self.steps)
        self.steps.append(float(t))
        self.latents = kwargs["latents"].clone()
        return kwargs

    def close(self):
        self._hook.remove()
        del self.pipe.scheduler.add_noise


def gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def stage_json(rec: Recorder, pipe) -> dict:
    sched = pipe.scheduler
    out = {
        "timesteps": rec.steps,
        "scheduler_timesteps": [float(t) for t in sched.timesteps],
        "sigmas": [float(s) for s in sched.sigmas],
    }
    if isinstance(pipe, StableDiffusionXLPipeline):  # img2img never scales by init_noise_sigma
        out["init_noise_sigma"] = float(sched.init_noise_sigma)
    return {
        **out,
        "time_ids": rec.cond["time_ids"].tolist(),
        "time_ids_dtype": str(rec.cond["time_ids"].dtype).replace("torch.", ""),
        "unet_batch": int(rec.cond["time_ids"].shape[0]),
        "scheduler_config": scheduler_json(sched),
    }


def run_base(pipe, case, seeds, output_type="np", generators=None, **extra):
    n = len(seeds)
    rec = Recorder(pipe)
    try:
        out = pipe(
            prompt=[case["prompt"]] * n,
            negative_prompt=None if case["negative_prompt"] is None else [case["negative_prompt"]] * n,
            num_inference_steps=case["steps"], guidance_scale=case["guidance"], width=case["width"],
            height=case["height"], generator=generators or gens(seeds), output_type=output_type,
            callback_on_step_end=rec.on_step_end, **extra,
        )
    finally:
        rec.close()
    return out.images, rec


def run_refiner(pipe, case, seeds, image, generators=None, **extra):
    n = len(seeds)
    rec = Recorder(pipe)
    try:
        out = pipe(
            prompt=[case["prompt"]] * n,
            negative_prompt=None if case["negative_prompt"] is None else [case["negative_prompt"]] * n,
            image=image, num_inference_steps=case["steps"], guidance_scale=case["guidance"],
            generator=generators or gens(seeds), output_type="np", callback_on_step_end=rec.on_step_end,
            **AESTHETIC, **extra,
        )
    finally:
        rec.close()
    return out.images, rec


@torch.no_grad()
def run_case(base, refiner, case: dict, seeds: list[int] | None = None) -> dict:
    """One case; returns the tensors to save and the json fields (timesteps etc.)."""
    seeds = seeds if seeds is not None else case["seeds"]
    key, res, info = case["name"], {}, {}
    lat_shape = (1, 4, case["height"] // 8, case["width"] // 8)
    hw = [case["height"], case["width"]]
    if case["kind"] in ("base", "base+refiner"):
        # Exactly what diffusers' randn_tensor draws per image, before init_noise_sigma.
        res[f"{key}_noise"] = torch.cat([torch.randn(lat_shape, generator=g) for g in gens(seeds)])
    if case["kind"] == "base":
        images, rec = run_base(base, case, seeds)
        res[key], res[f"{key}_latents"] = torch.from_numpy(np.ascontiguousarray(images)), rec.latents
        info["base"] = stage_json(rec, base)
        info["base"].update(original_size=hw, crops_coords_top_left=[0, 0], target_size=hw)
    elif case["kind"] == "base+refiner":
        handoff, rec = run_base(base, case, seeds, output_type="latent", denoising_end=case["denoising_end"])
        assert torch.equal(handoff, rec.latents)
        info["base"] = stage_json(rec, base)
        info["base"].update(original_size=hw, crops_coords_top_left=[0, 0], target_size=hw)
        # A fresh generator seeded the same, as a user calling both pipelines would.
        images, rrec = run_refiner(refiner, case, seeds, handoff, denoising_start=case["denoising_start"])
        assert rrec.add_noise is None, "denoising_start: the refiner must not add noise"
        res[f"{key}_handoff"] = handoff
        res[key], res[f"{key}_latents"] = torch.from_numpy(np.ascontiguousarray(images)), rrec.latents
        info["refiner"] = stage_json(rrec, refiner)
        info["refiner"].update(original_size=hw, crops_coords_top_left=[0, 0], **AESTHETIC, seeds=seeds)
    else:
        init = Image.open(REF_DIR / case["init_image"]).convert("RGB")
        images, rec = run_refiner(refiner, case, seeds, init, strength=case["strength"])
        an = rec.add_noise
        res[key], res[f"{key}_latents"] = torch.from_numpy(np.ascontiguousarray(images)), rec.latents
        res[f"{key}_noise"] = an["noise"]
        res[f"{key}_init_latents"] = an["original"]
        res[f"{key}_init"] = refiner.image_processor.preprocess(init)
        info["refiner"] = stage_json(rec, refiner)
        info["refiner"].update(original_size=hw, crops_coords_top_left=[0, 0], **AESTHETIC,
                               noise_timestep=an["timesteps"].tolist())
    return {"tensors": res, "info": info}


@torch.no_grad()
def check_case(base, refiner, case: dict, res: dict) -> None:
    """Self-checks: latents decode to the images; the saved noise is what the seeds draw and
    reproduces the images when passed in."""
    key, t = case["name"], res["tensors"]
    vae = base.vae
    dec = vae.decode(t[f"{key}_latents"] / vae.config.scaling_factor, return_dict=False)[0]
    img = base.image_processor.postprocess(dec, output_type="np")
    assert np.array_equal(img, t[key].numpy()), f"{key}: latents do not decode to the images"
    if case["kind"] == "base":
        again, _ = run_base(base, case, case["seeds"], latents=t[f"{key}_noise"].clone())
        assert np.array_equal(again, t[key].numpy()), f"{key}: the saved noise is not the pipeline's"
    elif case["kind"] == "base+refiner":
        handoff, _ = run_base(base, case, case["seeds"], output_type="latent", latents=t[f"{key}_noise"].clone(),
                              denoising_end=case["denoising_end"])
        assert torch.equal(handoff, t[f"{key}_handoff"]), f"{key}: the saved noise is not the pipeline's"
        # The refiner draws nothing when denoising_start is set: any generator gives the same images.
        again, _ = run_refiner(refiner, case, case["seeds"], handoff, generators=gens([s + 1000 for s in case["seeds"]]),
                               denoising_start=case["denoising_start"])
        assert np.array_equal(again, t[key].numpy()), f"{key}: the refiner's generator changed the images"
    else:
        # Per image i, generator i draws the VAE posterior's eps first, then the add_noise noise.
        init = t[f"{key}_init"]
        dist = vae.encode(init).latent_dist
        eps, noise = [], []
        for g in gens(case["seeds"]):
            eps.append(torch.randn(dist.mean.shape, generator=g))
            noise.append(torch.randn(dist.mean.shape, generator=g))
        eps, noise = torch.cat(eps), torch.cat(noise)
        assert torch.equal(noise, t[f"{key}_noise"]), f"{key}: the add_noise noise is not the second draw"
        init_latents = vae.config.scaling_factor * (dist.mean + dist.std * eps)
        gap = float((init_latents - t[f"{key}_init_latents"]).abs().max())
        assert gap < 1e-5, f"{key}: init latents != scaling_factor * (mean + std * eps): {gap}"
        t[f"{key}_posterior_noise"] = eps


def image_stats(name: str, images: np.ndarray) -> None:
    sat = float(((images <= 0.0) | (images >= 1.0)).mean())
    print(f"  {name}: shape {list(images.shape)} mean {images.mean():.3f} std {images.std():.3f} "
          f"min {images.min():.3f} max {images.max():.3f} saturated {sat:.1%}")
    assert images.std() > 0.1, f"{name}: images are too flat"
    assert sat < 0.5, f"{name}: images are mostly saturated"


def numpy_to_png(images: np.ndarray, stem: str) -> None:
    """diffusers' numpy_to_pil: uint8 = round(x * 255)."""
    for i, im in enumerate((images * 255).round().astype("uint8")):
        Image.fromarray(im).save(REF_DIR / "png" / f"{stem}_{i}.png")


def make_pipelines(base, refiner, base_mem, refiner_mem) -> tuple[list, dict]:
    cases_json, tensors = [], {}
    print("pipeline cases:")
    for case in PIPELINE_CASES:
        if case["kind"] == "refiner_img2img" and not (REF_DIR / case["init_image"]).exists():
            raise SystemExit(f"{case['init_image']} must be written by an earlier case")
        res = run_case(base, refiner, case)
        check_case(base, refiner, case, res)
        # The in-memory pipelines must agree with the folders. Not bit for bit: the loaded weights
        # live in the mmapped file at offsets that are not 64-byte aligned, and torch's CPU GEMM
        # takes another (differently rounding) path for those (text_projection: ~2e-7).
        mem = run_case(base_mem, refiner_mem, case)
        key = case["name"]
        mem_gap = float((mem["tensors"][key] - res["tensors"][key]).abs().max())
        assert mem_gap < BATCH_IMAGE_ATOL, f"{key}: reload changed the images by {mem_gap}"
        images = res["tensors"][key].numpy()
        image_stats(key, images)
        print(f"  {key}: in-memory vs loaded folders: max |d| image {mem_gap:.2e}")
        if len(case["seeds"]) > 1:
            for i, s in enumerate(case["seeds"]):
                single = run_case(base, refiner, case, seeds=[s])["tensors"]
                img_gap = float((single[key][0] - res["tensors"][key][i]).abs().max())
                lat_gap = float((single[f"{key}_latents"][0] - res["tensors"][f"{key}_latents"][i]).abs().max())
                assert torch.equal(single[f"{key}_noise"][0], res["tensors"][f"{key}_noise"][i])
                assert img_gap < BATCH_IMAGE_ATOL, f"{key}: image {i} (seed {s}) differs from n=1 by {img_gap}"
                print(f"  {key}: image {i} vs its n=1 run (seed {s}): max |d| image {img_gap:.2e}, latents {lat_gap:.2e}")
        tensors.update(res["tensors"])
        numpy_to_png(images, key)
        if key == "base":
            # The refiner img2img cases start from this image, as a PNG (what a user would have).
            Image.fromarray((images[0] * 255).round().astype("uint8")).save(REF_DIR / "refiner_init.png")
        cases_json.append({**case, "key": key, **res["info"]})
    return cases_json, tensors


# ---------------------------------------------------------------------------------------------
# README section
# ---------------------------------------------------------------------------------------------

README_BEGIN = "<!-- BEGIN sdxl (tools/reference/make_sdxl.py) -->"
README_END = "<!-- END sdxl -->"

README_SECTION = """\
## sdxl/, ../tiny-sdxl/ and ../tiny-sdxl-refiner/ (tools/reference/make_sdxl.py)

### ../tiny-sdxl/
A random-weight SDXL base in the layout of stabilityai/stable-diffusion-xl-base-1.0, all f32,
~{base_mb:.1f} MB: model_index.json (`StableDiffusionXLPipeline`, `force_zeros_for_empty_prompt`
true as the real one; image_encoder/feature_extractor [null, null] as a current save writes them),
text_encoder/ and text_encoder_2/ (`config.json`, `model.safetensors`), tokenizer/, tokenizer_2/,
unet/ and vae/ (`config.json`, `diffusion_pytorch_model.safetensors`), scheduler/. Like the hub's
files where a current `save_pretrained` would differ:
- tokenizer/ is ../tiny-sd15/tokenizer (the hub's four files, vocabulary {vocab_size},
  `<|startoftext|>` = {bos}, `<|endoftext|>` = {eos} = its pad).
- tokenizer_2/ has the same vocab.json and merges.txt, and SDXL's tokenizer_2
  tokenizer_config.json / special_tokens_map.json: `"pad_token": "!"` (plus
  `clean_up_tokenization_spaces` true, no `name_or_path`). "!" is id {bang} (the first byte
  character, as in the real vocabulary), so tokenizer_2 pads with {bang}. transformers makes
  the pad token an added special token, split out of the raw text before BPE: "sofa!!" is
  `s of a</w> ! !` ({bang}, {bang}; no `</w>`) under tokenizer_2 but `s of a</w> !!</w>` under
  tokenizer/, so the two id rows of a prompt with "!" differ in more than the padding.
- text_encoder/model.safetensors has the hub's `text_model.` key prefix (transformers 5 saves
  CLIPTextModel without it) and, like SDXL's files (saved by transformers 4.32, after
  `position_ids` stopped being persistent), no `position_ids`: a loader must not need it. text_encoder_2/model.safetensors: `text_model.*` and
  `text_projection.weight` [{te2_proj},{te2_hidden}] (no bias), no `position_ids`.
- scheduler/scheduler_config.json is SDXL's verbatim (`EulerDiscreteScheduler`,
  `_diffusers_version` 0.19.0.dev0): timestep_spacing "leading", steps_offset 1,
  interpolation_type "linear", use_karras_sigmas false, prediction_type "epsilon",
  scaled_linear betas 0.00085..0.012 over 1000. Keys Euler gained later take their defaults
  (final_sigmas_type "zero", timestep_type "discrete", sigma_min/max null, ...).
- unet/ and vae/ config.json are as diffusers 0.42.1 writes them (more keys than the hub's
  files, same meaning).

Sizes: text_encoder hidden {te1_hidden}, 3 layers, 4 heads, intermediate 37, quick_gelu;
text_encoder_2 hidden {te2_hidden}, 3 layers, 4 heads, intermediate 53, `gelu` (erf),
projection_dim {te2_proj}. Both configs keep SDXL's bos/eos/pad ids 0/2/1: eos_token_id == 2 is
transformers' legacy pooling rule, `pooled = last_hidden_state[argmax(input_ids)]`, the first
`<|endoftext|>` (the largest id; also with tokenizer_2's {bang} padding and "!" ids in the text).
UNet as SDXL's: down (DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D), up
(CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D), block_out_channels {base_ch}, 2 layers per
block, `attention_head_dim` {base_heads} (the legacy name: head *counts*, as SDXL's (5, 10, 20);
head sizes 8, 8, 6), `transformer_layers_per_block` {base_depth} (SDXL's is (1, 2, 10); up blocks
use the reversed list, so each level has the same depth going up; the mid block uses the last,
{base_mid}), use_linear_projection true (proj_in/proj_out are Linear), cross_attention_dim
{base_xattn} = {te1_hidden} + {te2_hidden}, norm_num_groups 4, time embedding 32,
addition_embed_type "text_time", addition_time_embed_dim {add_dim},
projection_class_embeddings_input_dim {base_addin} = {te2_proj} + 6 x {add_dim}, sample_size 8
(diffusers' default image size: 64x64). VAE: ../tiny-sd15's layout (block_out_channels
{vae_ch}) with SDXL's scaling_factor 0.13025 and force_upcast true. Every tensor is drawn by
sd15_tiny.reinit (seeds {seeds}).

### ../tiny-sdxl-refiner/
A random-weight SDXL refiner in the layout of stabilityai/stable-diffusion-xl-refiner-1.0, ~{ref_mb:.1f} MB:
model_index.json (`StableDiffusionXLImg2ImgPipeline`, text_encoder and tokenizer [null, null],
`requires_aesthetics_score` true, `force_zeros_for_empty_prompt` false, as the real one),
text_encoder_2/, tokenizer_2/, unet/, vae/, scheduler/. text_encoder_2/, tokenizer_2/, vae/ and
scheduler/ are byte-identical to the base's (the real refiner shares bigG and the VAE). UNet as the
real refiner's: down (DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D), up
(UpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D), block_out_channels {ref_ch},
attention_head_dim {ref_heads} (real (6, 12, 24, 24)), transformer_layers_per_block {ref_depth}
(one int for every level and the mid block; real 4), cross_attention_dim {te2_hidden} (bigG
alone), addition_time_embed_dim {add_dim}, projection_class_embeddings_input_dim {ref_addin} =
{te2_proj} + 5 x {add_dim}, use_linear_projection true, norm_num_groups 4, sample_size 8.

All tensors below are f32 unless noted, contiguous, NCHW unless noted.

### sdxl/text_encoders.safetensors
The two prompts of sd15/clip.safetensors ("a lighthouse at dusk", and a long one that both
tokenizers truncate), tokenized as the pipeline does (`padding="max_length"`, `max_length=77`,
`truncation=True`), no attention mask (causal only).
- `input_ids_1`, `input_ids_2` i64 [2,77]: tokenizer / tokenizer_2. Row 0 is the same up to the
  eos at 11, then pads {eos} vs {bang}. Row 1 differs from position 19 ("!!" -> "!" "!", see
  above): its eos is at 76 in both.
- `empty_input_ids_1`, `empty_input_ids_2` i64 [1,77]: "" (what a CFG negative "" encodes:
  bos, eos, then pads).
- `te1_penultimate` [2,77,{te1_hidden}]: text_encoder `hidden_states[-2]` (raw, no final_layer_norm)
- `te2_penultimate` [2,77,{te2_hidden}]: text_encoder_2 `hidden_states[-2]`
- `te2_pooled` [2,{te2_hidden}]: text_encoder_2's `pooler_output` (final_layer_norm'd state at the eos)
- `te2_text_embeds` [2,{te2_proj}]: `text_projection(te2_pooled)` (CLIPTextModelWithProjection's
  `text_embeds`; this, not the pooler output, is SDXL's pooled embedding)
- `pipe.encode_prompt("a lighthouse at dusk", do_classifier_free_guidance=True)` of the base:
  `prompt_embeds` [1,77,{base_xattn}] = concat(te1_penultimate, te2_penultimate) on the last
  axis; `pooled_prompt_embeds` [1,{te2_proj}] = te2_text_embeds.
  `negative_prompt_embeds_none` [1,77,{base_xattn}], `negative_pooled_none` [1,{te2_proj}]:
  negative_prompt None -> all zeros (force_zeros_for_empty_prompt).
  `negative_prompt_embeds_empty`, `negative_pooled_empty`: negative_prompt "" -> "" encoded
  like a prompt (not zeros: force_zeros applies only to None).
- The refiner's `encode_prompt` (text_encoder_2 alone): `refiner_prompt_embeds` [1,77,{te2_hidden}]
  = te2_penultimate of prompt 0 (its pooled = `pooled_prompt_embeds`);
  `refiner_negative_prompt_embeds_none` [1,77,{te2_hidden}]: negative None -> "" encoded
  (force_zeros false), = the last {te2_hidden} features of `negative_prompt_embeds_empty`; its
  pooled = `negative_pooled_empty`.
Rows of a batch of 2 differ from batch-1 runs by ~2e-7 (CPU kernels); the encode_prompt
tensors are batch-1 runs.

### sdxl/unet.safetensors (base UNet)
- `sample` [2,4,8,8], `timestep` [1] = 801.0 (broadcast), `encoder_hidden_states` [2,77,{base_xattn}]
  (= concat(te1_penultimate, te2_penultimate) of both prompts), `text_embeds` [2,{te2_proj}]
  (= te2_text_embeds), `time_ids` [2,6] f32 = [[64,64,0,0,64,64], [1024,768,32,16,64,80]]
  (orig h, orig w, crop top, crop left, target h, target w), `out` [2,4,8,8]
- `add_embeds` [2,{base_addin}]: the add_embedding's input, concat(text_embeds,
  sinusoid(time_ids.flatten()).reshape(B, 6 x {add_dim})) -- text first
- `emb` [2,32]: time_embedding(sinusoid(timestep)) + add_embedding(add_embeds), what the resnets get
- `odd_sample` [1,4,8,10] (10 -> 5 -> 3 on the way down; upsampling takes the skip's size),
  `odd_timestep` [1] = 537.25, `odd_encoder_hidden_states` [1,77,{base_xattn}] (prompt 1's),
  `odd_text_embeds` [1,{te2_proj}], `odd_time_ids` [1,6] = [[64,80,0,0,64,80]], `odd_out` [1,4,8,10]
The time-id sinusoid is diffusers' `Timesteps({add_dim}, flip_sin_to_cos=True, freq_shift=0)`, the
same function as the timestep's (cos half first), applied to each id separately.

### sdxl/refiner_unet.safetensors
The same keys for the refiner UNet: `sample` [2,4,8,8], `timestep` [1] = 181.0,
`encoder_hidden_states` [2,77,{te2_hidden}] (= te2_penultimate), `text_embeds` [2,{te2_proj}],
`time_ids` [2,5] f32 = [[64,64,0,0,6.0], [1024,768,32,16,2.5]] (orig h, orig w, crop top, crop
left, aesthetic score), `add_embeds` [2,{ref_addin}], `emb` [2,32], `out` [2,4,8,8]; `odd_sample`
[1,4,8,10] (4 levels: 10 -> 5 -> 3 -> 2), `odd_timestep` [1] = 63.5, `odd_encoder_hidden_states`
[1,77,{te2_hidden}], `odd_text_embeds` [1,{te2_proj}], `odd_time_ids` [1,5] = [[64,80,0,0,6.0]],
`odd_out` [1,4,8,10].

### sdxl/pipeline.json, sdxl/pipeline.safetensors, sdxl/refiner_init.png, sdxl/png/
diffusers on the CPU in f32, loaded from ../tiny-sdxl and ../tiny-sdxl-refiner with
`from_pretrained` (add_watermarker=False, see below), `generator=[Generator("cpu").manual_seed(s)
for s in seeds]`, `output_type="np"`, prompt "a lighthouse at dusk" (one per image),
negative_prompt likewise or None, guidance 5.0 unless noted, the folders' Euler scheduler
("euler"). The refiner pipelines get their own fresh generators seeded the same (as a user
calling both pipelines would) and the refiner's default aesthetic_score 6.0 /
negative_aesthetic_score 2.5 (passed explicitly).

pipeline.json: a list of cases with `name` (= `key`), `kind` ("base", "base+refiner",
"refiner_img2img"), `prompt`, `negative_prompt` (null = not given), `seeds`, `steps`
(num_inference_steps of each pipeline), `guidance`, `width`, `height`, `scheduler`, and
`denoising_end` / `denoising_start` (base+refiner) or `strength` and `init_image` (a file in
sdxl/). Then one object per pipeline run, `base` and/or `refiner`: `timesteps` (those the loop
ran, after any cut), `scheduler_timesteps` and `sigmas` (the scheduler's full set_timesteps
result, final 0 included), `init_noise_sigma` (base only: img2img never applies it),
`time_ids` (the UNet's `added_cond_kwargs["time_ids"]` as passed, all rows), `time_ids_dtype`,
`unet_batch` (rows per UNet call: 2n with CFG), `scheduler_config` (effective, class
included), `original_size` / `target_size` ([h, w]) and `crops_coords_top_left` used (all
defaults), and for the refiner `aesthetic_score`, `negative_aesthetic_score`, `seeds` (of its
fresh generators) and, for img2img, `noise_timestep` (the timestep add_noise used, per image).

pipeline.safetensors, per case `<key>`:
- `<key>` [n,h,w,3]: the images in [0,1] (NHWC, the np output)
- `<key>_latents` [n,4,h/8,w/8]: the final latents (of the last pipeline run), before
  `/ scaling_factor` and the VAE decode
- `<key>_noise` [n,4,h/8,w/8]: base and base+refiner: the initial noise as drawn (per seed,
  `randn([1,4,h/8,w/8])`, concatenated) before `* init_noise_sigma`; refiner_img2img: the
  noise handed to `scheduler.add_noise` (see below)
- base+refiner: `<key>_handoff` [n,4,h/8,w/8]: the base's output with output_type="latent" and
  `denoising_end`, handed to the refiner as `image=` (latents, not scaled)
- refiner_img2img: `<key>_init` [1,3,h,w]: the preprocessed init image in [-1,1];
  `<key>_posterior_noise` [n,4,h/8,w/8]: the eps of the VAE posterior sample;
  `<key>_init_latents` [n,4,h/8,w/8] = 0.13025 * (mean + exp(0.5 * logvar) * eps), before add_noise

Cases:
{cases}

`refiner_init.png` is case `base`'s image as PNG (diffusers' numpy_to_pil rounding), read back
for the img2img cases. `png/<key>_<i>.png`: every image as uint8 `round(x * 255)`, to eyeball.

### diffusers' SDXL behaviour these references pin down (diffusers {diffusers_version})
- Prompt embeddings: each tokenizer/encoder pair gets the prompt (prompt_2 defaults to prompt);
  `prompt_embeds = concat(te1.hidden_states[-2], te2.hidden_states[-2], dim=-1)`, no final
  layer norm; pooled = the first encoder output whose `[0]` is 2-D, i.e. te2's projected
  `text_embeds`. The refiner (no text_encoder) uses te2 alone.
- Negatives: CFG is on when guidance_scale > 1. negative_prompt None with
  force_zeros_for_empty_prompt (base: true) -> `zeros_like` for both embeds and pooled;
  otherwise (the refiner, or any explicit negative including "") the negative (default "")
  is encoded exactly like a prompt (tokenizer_2 pads it with {bang}). negative_prompt_2
  defaults to negative_prompt. UNet batches are [negatives; positives]. So in the `ensemble`
  case "no negative" means zeros in the base but "" encoded in the refiner.
- Base time ids: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`, original_size and
  target_size default to (height, width) of the request, crops to (0, 0); a tensor of the
  prompt embeddings' dtype (f32 here; the values are exact in f16 too). The negative row equals
  the positive one unless *both* negative_original_size and negative_target_size are given
  (negative_crops_coords_top_left alone is ignored). With CFG the pipeline builds
  `cat([neg, pos]).repeat(n, 1)`, i.e. rows alternate neg, pos per image while the embeddings
  are [neg x n; pos x n]: misaligned for n > 1 when neg != pos (a diffusers quirk; harmless
  here, all rows equal).
- Refiner time ids (requires_aesthetics_score): `[orig_h, orig_w, crop_top, crop_left,
  aesthetic_score]`, negative `[neg_orig_h, neg_orig_w, neg_crop_top, neg_crop_left,
  negative_aesthetic_score]`; aesthetic_score 6.0, negative 2.5 by default (the json
  shows [..., 2.5] and [..., 6.0] rows); original_size defaults to the size of the latents
  it denoises x 8 (the image's size, or the handoff's), negative_original_size to original_size,
  negative crops to (0, 0) (not to crops_coords_top_left). Rows: [neg x n; pos x n] (aligned).
  target_size is not used.
- Added conditioning: `add_embeds = concat(text_embeds, sinusoid(time_ids.flatten()).reshape(B, -1))`,
  `emb = time_embedding(sinusoid(t)) + add_embedding(add_embeds)` (unet.safetensors `add_embeds`, `emb`).
- Euler "leading": step_ratio = 1000 // steps, timesteps = arange(steps) * step_ratio reversed
  + steps_offset (1); sigmas interpolated (linear) at those timesteps, then a final 0;
  init_noise_sigma = sqrt(sigma_max^2 + 1) with sigma_max the first inference sigma (not
  `sigma_max` itself, which is for "linspace"/"trailing").
- denoising_end (base; a float strictly inside (0, 1), else ignored):
  `cutoff = int(round(1000 - denoising_end * 1000))` (Python's round, half to even, on f64),
  the loop keeps the leading timesteps with `t >= cutoff`. output_type="latent" returns the
  latents as they are (no `/ scaling_factor`).
- denoising_start (refiner; a float in (0, 1)): the same cutoff; `n = count(t < cutoff)`
  (+1 if the scheduler is 2nd order and n is even), `t_start = len(timesteps) - n`, the loop
  runs `timesteps[t_start:]` after `scheduler.set_begin_index(t_start)` (so the sigmas continue
  where the base stopped). `strength` is ignored, and no noise is added: a 4-channel `image` is
  taken as latents as is (no VAE, no scaling factor). Nothing is drawn from the generators
  (checked: other seeds give the same images). With 10 steps and 0.8: base runs 901..201
  (8 steps), refiner 101, 1.
- img2img (refiner, no denoising_start): `init = min(int(steps * strength), steps)`,
  `t_start = max(steps - init, 0)`, timesteps[t_start * order:], begin index t_start * order
  (10 steps x 0.3 -> int(3.0000000000000004) = 3 steps: 201, 101, 1). The image is
  preprocessed to [-1, 1], encoded per image i (`image[i:i+1]`, duplicated to the batch
  first) with `latent_dist.sample(generator[i])` (eps = generator i's first draw), times
  scaling_factor; then the add_noise noise is drawn per generator (its second draw) and
  `latents = init_latents + noise * sigma[t_start]` (Euler add_noise; no init_noise_sigma).
- force_upcast true: the base upcasts the VAE only when it is f16; img2img casts the VAE to f32
  for encoding and back to the pipeline dtype: in f32 both are no-ops, so these references do
  not exercise them.
- Watermark: with add_watermarker None (the default) diffusers applies the invisible-watermark
  DWT watermark to every decoded image whenever that package is installed; it is not a
  diffusers dependency and was not installed here (the references pass add_watermarker=False).

Precision: image i of a batch equals its n=1 run only to ~8e-6 (latents ~2e-4: torch's CPU
kernels round differently per batch size), and the in-memory models differ from the loaded
folders by ~3e-6 in the images (safetensors weights mmapped at offsets not 64-byte aligned take
another GEMM path). Expect that much float noise against these pipeline references.
"""


def case_line(c: dict) -> str:
    neg = "no negative" if c["negative_prompt"] is None else f"negative {c['negative_prompt']!r}"
    parts = [f"`{c['name']}` ({c['kind']}, seeds {c['seeds']}, {c['steps']} steps, {neg}, "
             f"{c['width']} wide x {c['height']} high, guidance {c['guidance']}"]
    if c["kind"] == "base+refiner":
        parts.append(f", denoising_end/start {c['denoising_end']}: base {len(c['base']['timesteps'])} steps, "
                     f"refiner {len(c['refiner']['timesteps'])}")
    if c["kind"] == "refiner_img2img":
        parts.append(f", strength {c['strength']} of `{c['init_image']}`: {len(c['refiner']['timesteps'])} steps")
    return "- " + "".join(parts).replace(", guidance", ",\n  guidance", 1) + ")"

# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bpe", help=f"path to {BPE_NAME} (default: installed open_clip, else pip download)")
    ap.add_argument("--models-only", action="store_true", help="write the two model folders and stop")
    args = ap.parse_args()

    if importlib.util.find_spec("ftfy") is not None:
        raise SystemExit("ftfy is installed: uninstall it (pip uninstall -y ftfy); the references assume it is absent")
    setup_determinism()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")

    base_mem, refiner_mem, vocab, merges = build_models(args.bpe)
    base, refiner = load_folders(base_mem, refiner_mem)
    if args.models_only:
        return

    texts = CLIP_PROMPTS + [NEG, ""]
    check_ids(base.tokenizer, texts, vocab, merges, vocab["<|endoftext|>"])
    check_ids(base.tokenizer_2, texts, vocab, merges, vocab["!"])

    REF_DIR.mkdir(parents=True, exist_ok=True)
    if (REF_DIR / "png").exists():
        shutil.rmtree(REF_DIR / "png")
    (REF_DIR / "png").mkdir()
    te = make_text_encoders(base, refiner)
    save_tensors(REF_DIR / "text_encoders.safetensors", te)
    save_tensors(REF_DIR / "unet.safetensors", make_unet(base, te))
    save_tensors(REF_DIR / "refiner_unet.safetensors", make_refiner_unet(refiner, te))
    cases_json, tensors = make_pipelines(base, refiner, base_mem, refiner_mem)
    save_tensors(REF_DIR / "pipeline.safetensors", tensors)
    (REF_DIR / "pipeline.json").write_text(json.dumps(cases_json, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    size_mb = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 1e6  # noqa: E731
    b, r = BASE_UNET_CONFIG, REFINER_UNET_CONFIG
    write_readme_section(begin=README_BEGIN, end=README_END, section=README_SECTION.format(
        base_mb=size_mb(BASE_DIR), ref_mb=size_mb(REFINER_DIR), vocab_size=len(vocab),
        bos=vocab["<|startoftext|>"], eos=vocab["<|endoftext|>"], bang=vocab["!"],
        te1_hidden=TE1_HIDDEN, te2_hidden=TE2_HIDDEN, te2_proj=TE2_PROJECTION, add_dim=ADD_TIME_DIM,
        base_ch=tuple(b["block_out_channels"]), base_heads=tuple(b["attention_head_dim"]),
        base_depth=tuple(b["transformer_layers_per_block"]), base_mid=b["transformer_layers_per_block"][-1],
        base_xattn=b["cross_attention_dim"], base_addin=b["projection_class_embeddings_input_dim"],
        ref_ch=tuple(r["block_out_channels"]), ref_heads=tuple(r["attention_head_dim"]),
        ref_depth=r["transformer_layers_per_block"], ref_addin=r["projection_class_embeddings_input_dim"],
        vae_ch=tuple(SDXL_VAE_CONFIG["block_out_channels"]), seeds=", ".join(f"{k} {v}" for k, v in SEEDS.items()),
        cases="\n".join(case_line(c) for c in cases_json), diffusers_version=diffusers.__version__,
    ))
    print(f"wrote {REF_DIR.relative_to(REPO)}: {size_mb(REF_DIR) * 1e3:.1f} KB")


if __name__ == "__main__":
    main()
