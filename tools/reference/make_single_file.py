#!/usr/bin/env python3
"""Writes the tiny SD 1.5 as a single-file checkpoint in the original (CompVis/A1111) layout, and
the key list of a real SD 1.5 checkpoint, for crates/sdgen/tests/single_file.rs.

Writes (relative to the repository root):
  testdata/tiny-sd15-single/tiny-sd15.safetensors   testdata/tiny-sd15/ in one file, original names
  testdata/tiny-sd15-single/sd15-real-keys.json     names, shapes and dtypes of the tensors of a real
                                                    SD 1.5 checkpoint (v1-5-pruned-emaonly layout),
                                                    each with its diffusers name, no weights
  testdata/tiny-sd15-single/README.md

The mapping diffusers -> original is the inverse of diffusers' `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint` (loaders/single_file_utils.py),
reimplemented here for any layers_per_block / number of levels (diffusers' own
scripts/convert_diffusers_to_original_stable_diffusion.py hard-codes SD 1.5's 4 levels x 2 layers,
which the tiny model does not have). It is checked three ways, and the script stops on failure:
  1. diffusers' own convert_ldm_* functions, run on the written checkpoint, give back exactly the
     folder's tensors (names, shapes, values);
  2. `StableDiffusionPipeline.from_single_file(file, config=testdata/tiny-sd15, local_files_only=True)`
     produces the same images, bit for bit, as `from_pretrained(testdata/tiny-sd15)` for every
     pipeline case of make_sd15.py (and therefore as testdata/reference/sd15/pipeline.safetensors);
  3. for the real-shaped key list: diffusers' convert_ldm_* functions map the original names back
     to exactly the state_dict names and shapes of UNet2DConditionModel / AutoencoderKL /
     CLIPTextModel built (on the meta device, no weights) from SD 1.5's real configs.

Run `python tools/reference/make_single_file.py` after make_sd15.py (it reads testdata/tiny-sd15/).
Deterministic: re-running rewrites byte-identical files.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd15 import PIPELINE_CASES, call_pipeline, setup_determinism  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "testdata" / "tiny-sd15"
OUT_DIR = REPO / "testdata" / "tiny-sd15-single"
CHECKPOINT = OUT_DIR / "tiny-sd15.safetensors"
REAL_KEYS = OUT_DIR / "sd15-real-keys.json"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# stable-diffusion-v1-5/stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json (the
# architecture fields; the Rust crate bundles the files verbatim).
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD15_VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SD15_CLIP = dict(
    attention_dropout=0.0,
    bos_token_id=0,
    dropout=0.0,
    eos_token_id=2,
    hidden_act="quick_gelu",
    hidden_size=768,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=3072,
    layer_norm_eps=1e-05,
    max_position_embeddings=77,
    num_attention_heads=12,
    num_hidden_layers=12,
    pad_token_id=1,
    projection_dim=768,
    vocab_size=49408,
)


# ---------------------------------------------------------------------------------------------
# diffusers -> original names
# ---------------------------------------------------------------------------------------------

# ResnetBlock2D leaves: diffusers -> openaimodel.ResBlock (update_unet_resnet_ldm_to_diffusers).
UNET_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]
UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
# VAE mid attention: diffusers -> ldm AttnBlock (update_vae_attentions_ldm_to_diffusers).
VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def leaf(rest: str, table) -> str:
    for new, old in table:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(key: str, cfg: dict) -> str:
    lpb = cfg["layers_per_block"]
    for new, old in UNET_FIXED.items():
        if key.startswith(new):
            return old + key[len(new):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * (lpb + 1) + j
        return f"input_blocks.{i}.0.{leaf(rest, UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{leaf(m[2], UNET_RESNET)}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", key)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * (lpb + 1) + j
        return f"output_blocks.{i}.0.{leaf(rest, UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        b = int(m[1])
        # The upsampler follows the block's last resnet (slot 1) or, in an attention block, its
        # last attention (slot 2).
        slot = 2 if cfg["up_block_types"][b].startswith("CrossAttn") else 1
        return f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.{m[2]}"
    raise SystemExit(f"UNet key {key} has no original name")


def vae_to_ldm(key: str, cfg: dict) -> str:
    n = len(cfg["block_out_channels"])
    key = key.replace("conv_shortcut.", "nin_shortcut.")
    m = re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{leaf(m[2], VAE_ATTN)}"
    if re.match(r"(encoder|decoder)\.conv_(in|out)\.|(post_)?quant_conv\.", key):
        return key
    raise SystemExit(f"VAE key {key} has no original name")


def is_vae_attn_matrix(ldm_key: str) -> bool:
    """The mid attention's q/k/v/proj_out weights are 1x1 convolutions [C, C, 1, 1] in the original."""
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


def to_ldm(folder: dict[str, dict[str, torch.Tensor]], unet_cfg: dict, vae_cfg: dict) -> dict[str, torch.Tensor]:
    out = {}

    def put(key, value):
        assert key not in out, f"two tensors map to {key}"
        out[key] = value

    for k, v in folder["unet"].items():
        put(UNET_PREFIX + unet_to_ldm(k, unet_cfg), v)
    for k, v in folder["vae"].items():
        ldm = VAE_PREFIX + vae_to_ldm(k, vae_cfg)
        put(ldm, v[:, :, None, None] if is_vae_attn_matrix(ldm) else v)
    for k, v in folder["text_encoder"].items():
        assert k.startswith("text_model."), k
        put(CLIP_PREFIX + k, v)
    return out


# What a real SD 1.5 file carries besides the three models (v1-5-pruned-emaonly.safetensors): the
# DDPM schedule buffers of ldm's LatentDiffusion and the EMA bookkeeping scalars. Loaders ignore them.
def ddpm_extras() -> dict[str, torch.Tensor]:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return {
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod.float(),
        "model_ema.decay": torch.tensor(0.9999, dtype=torch.float32),
        "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
    }


REAL_EXTRA_NAMES = [
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
]


# ---------------------------------------------------------------------------------------------
# Checks against diffusers
# ---------------------------------------------------------------------------------------------


def diffusers_view(ckpt: dict, unet_cfg: dict, vae_cfg: dict) -> dict[str, dict]:
    """What diffusers' single-file loader makes of `ckpt`, per component."""
    clip = convert_ldm_clip_checkpoint(ckpt)
    return {
        "unet": convert_ldm_unet_checkpoint(ckpt, unet_cfg),
        "vae": convert_ldm_vae_checkpoint(ckpt, vae_cfg),
        "text_encoder": clip,
    }


def same_tensors(name: str, got: dict, want: dict, values: bool = True) -> None:
    assert got.keys() == want.keys(), f"{name}: {sorted(set(got) ^ set(want))[:8]}"
    for k in want:
        assert got[k].shape == want[k].shape, f"{name}.{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}"
        if values:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{name}.{k} differs"


def load_folder() -> dict[str, dict[str, torch.Tensor]]:
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "vae": "vae/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
    }
    out = {}
    for comp, rel in files.items():
        with safe_open(str(FOLDER / rel), "pt") as f:
            out[comp] = {k: f.get_tensor(k) for k in f.keys()}
    return out


@torch.no_grad()
def check_images(path: Path) -> None:
    folder = StableDiffusionPipeline.from_pretrained(FOLDER, dtype=torch.float32)
    single = StableDiffusionPipeline.from_single_file(
        str(path), config=str(FOLDER), local_files_only=True, torch_dtype=torch.float32
    )
    for p in (folder, single):
        p.set_progress_bar_config(disable=True)
    for comp in ("unet", "vae", "text_encoder"):
        same_tensors(f"from_single_file {comp}", getattr(single, comp).state_dict(), getattr(folder, comp).state_dict())
    assert type(single.scheduler) is type(folder.scheduler) and dict(single.scheduler.config) == dict(folder.scheduler.config)
    # The single-file pipeline really takes its weights from the file, not from `config`'s folder:
    # a copy with one tensor per model changed loads changed.
    with safe_open(str(path), "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}
    probes = {
        "unet": UNET_PREFIX + "out.2.bias",
        "vae": VAE_PREFIX + "decoder.mid.attn_1.q.weight",
        "text_encoder": CLIP_PREFIX + "text_model.final_layer_norm.bias",
    }
    for key in probes.values():
        ckpt[key] = ckpt[key] + 1.0
    with tempfile.TemporaryDirectory() as tmp:
        changed_path = Path(tmp) / "changed.safetensors"
        save_file(ckpt, str(changed_path))
        changed = StableDiffusionPipeline.from_single_file(
            str(changed_path), config=str(FOLDER), local_files_only=True, torch_dtype=torch.float32
        )
        for comp in probes:
            a, b = getattr(changed, comp).state_dict(), getattr(folder, comp).state_dict()
            assert sum(not torch.equal(a[k], b[k]) for k in b) == 1, f"{comp}: not loaded from the file"
    for case in PIPELINE_CASES:
        a, _ = call_pipeline(folder, case, case["seeds"])
        b, _ = call_pipeline(single, case, case["seeds"])
        assert np.array_equal(a.images, b.images), f"{case['name']}: single file and folder images differ"
        print(f"  {case['name']}: single-file images == folder images ({a.images.shape})")


def real_key_list() -> dict:
    """A real SD 1.5 checkpoint's tensor names/shapes/dtypes, built from the real configs (no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        clip = CLIPTextModel(CLIPTextConfig(**SD15_CLIP))
    sd = {
        "unet": unet.state_dict(),
        "vae": vae.state_dict(),
        # The hub's (transformers 4) names: `text_model.` prefix, and the position_ids buffer.
        "text_encoder": {
            **{("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in clip.state_dict().items()},
            "text_model.embeddings.position_ids": torch.empty((1, 77), dtype=torch.int64, device="meta"),
        },
    }
    ckpt = to_ldm(sd, SD15_UNET, SD15_VAE)
    for k in REAL_EXTRA_NAMES:
        ckpt[k] = torch.empty(1000, device="meta")
    ckpt["model_ema.decay"] = torch.empty((), device="meta")
    ckpt["model_ema.num_updates"] = torch.empty((), dtype=torch.int32, device="meta")
    assert infer_diffusers_model_type(ckpt) == "v1"
    view = diffusers_view(ckpt, SD15_UNET, SD15_VAE)
    for comp in sd:
        same_tensors(f"real {comp}", view[comp], sd[comp], values=False)
    # Where diffusers puts each original tensor (convert_ldm_* run on the names above).
    renamed = {}
    for comp, prefix in (("text_encoder", CLIP_PREFIX), ("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        for k in sd[comp]:
            ldm = prefix + (k if comp == "text_encoder" else (unet_to_ldm if comp == "unet" else vae_to_ldm)(
                k, SD15_UNET if comp == "unet" else SD15_VAE))
            renamed[ldm] = [comp, k]
    assert len(renamed) == sum(len(v) for v in sd.values())
    dtypes = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}
    return {k: [dtypes[v.dtype], list(v.shape), *renamed.get(k, [])] for k, v in sorted(ckpt.items())}


README = """\
# tiny-sd15-single/ (tools/reference/make_single_file.py)

- `tiny-sd15.safetensors`: ../tiny-sd15/ as one original-layout (CompVis / A1111 / ComfyUI)
  checkpoint, f32: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE, mid-attention
  q/k/v/proj_out stored as 1x1 convolutions [C, C, 1, 1]), `cond_stage_model.transformer.text_model.*`
  (CLIP, with the int64 `position_ids`), plus `betas`, `alphas_cumprod`, `model_ema.decay` and
  `model_ema.num_updates`, which real checkpoints carry and loaders ignore. diffusers'
  `from_single_file(file, config="testdata/tiny-sd15")` loads exactly the folder's tensors and
  draws the same images as the folder for every case of ../reference/sd15/pipeline.json (checked
  by the script, bit for bit), so those references hold for this file too.
- `sd15-real-keys.json`: the {n} tensors of a real SD 1.5 checkpoint (v1-5-pruned-emaonly
  layout), built from SD 1.5's real configs without weights: name -> [dtype, shape] for the
  schedule/EMA extras, name -> [dtype, shape, component, diffusers name] for the {m} model tensors,
  the diffusers name being where diffusers' convert_ldm_unet/vae/clip_checkpoint put it (checked
  by the script).
"""


def main() -> None:
    setup_determinism()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    unet_cfg = json.loads((FOLDER / "unet" / "config.json").read_text())
    vae_cfg = json.loads((FOLDER / "vae" / "config.json").read_text())
    folder = load_folder()

    ckpt = {**to_ldm(folder, unet_cfg, vae_cfg), **ddpm_extras()}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(ckpt.items())}, str(CHECKPOINT), metadata={"format": "pt"})
    print(f"wrote {CHECKPOINT.relative_to(REPO)}: {len(ckpt)} tensors, {CHECKPOINT.stat().st_size} bytes")

    # 1. diffusers' conversion of the file gives back the folder's tensors.
    with safe_open(str(CHECKPOINT), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    assert infer_diffusers_model_type(written) == "v1"
    view = diffusers_view(written, unet_cfg, vae_cfg)
    for comp in folder:
        same_tensors(f"convert_ldm {comp}", view[comp], folder[comp])
    print("  convert_ldm_* give back the folder's tensors")

    # 2. Same images through from_single_file.
    check_images(CHECKPOINT)

    # 3. The real-shaped key list.
    real = real_key_list()
    REAL_KEYS.write_text(json.dumps(real, separators=(",", ":")) + "\n", encoding="utf-8")
    n_model = sum(len(v) == 4 for v in real.values())
    print(f"wrote {REAL_KEYS.relative_to(REPO)}: {len(real)} tensors, {REAL_KEYS.stat().st_size} bytes")
    (OUT_DIR / "README.md").write_text(README.format(n=len(real), m=n_model), encoding="utf-8")


if __name__ == "__main__":
    main()
