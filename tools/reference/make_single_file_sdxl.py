#!/usr/bin/env python3
"""Writes the tiny SDXL base and refiner as single-file checkpoints in Stability's original
("sgm") layout, and the key lists of the real SDXL checkpoints, for
crates/sdgen/tests/single_file_sdxl.rs.

Writes (relative to the repository root):
  testdata/tiny-sdxl-single/tiny-sdxl-base.safetensors     testdata/tiny-sdxl/ in one file
  testdata/tiny-sdxl-single/tiny-sdxl-refiner.safetensors  testdata/tiny-sdxl-refiner/ in one file
  testdata/tiny-sdxl-single/sdxl-base-real-keys.json       names, shapes and dtypes of the tensors of
  testdata/tiny-sdxl-single/sdxl-refiner-real-keys.json    sd_xl_base_1.0 / sd_xl_refiner_1.0.safetensors,
                                                           each with its diffusers name(s), no weights
  testdata/tiny-sdxl-single/README.md

The layout (sgm's DiffusionEngine state dict, as the released files hold it):
  model.diffusion_model.*                      the UNet, in ldm's openaimodel names; SDXL's added
                                               embedding is `label_emb.0.{0,2}`
  first_stage_model.*                          the VAE, in ldm's names (mid-attention q/k/v/proj_out
                                               as 1x1 convolutions)
  conditioner.embedders.0.transformer.*        base: CLIP ViT-L (transformers' CLIPTextModel names,
                                               `text_model.*`, with the int64 `position_ids`)
  conditioner.embedders.1.model.*              base: OpenCLIP ViT-bigG in OpenCLIP's names
  conditioner.embedders.0.model.*              refiner: the same OpenCLIP ViT-bigG
OpenCLIP's names: `token_embedding.weight`, `positional_embedding`, `ln_final.*`, `text_projection`
(stored [width, embed] and applied as x @ P: diffusers' `text_projection.weight` is its transpose),
`logit_scale` (unused), and per layer `transformer.resblocks.N.{ln_1, ln_2, mlp.c_fc, mlp.c_proj,
attn.out_proj}` with q, k and v fused into `attn.in_proj_weight` / `attn.in_proj_bias` ([3W, W], [3W]).

The mapping diffusers -> original is the inverse of diffusers' `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint`
(loaders/single_file_utils.py), reimplemented here for any size. It is checked three ways, and the
script stops on failure:
  1. diffusers' own convert_* functions, run on the written files, give back exactly the folders'
     tensors (names, shapes, values);
  2. `StableDiffusionXLPipeline.from_single_file(file, config=testdata/tiny-sdxl, local_files_only=True)`
     (and `StableDiffusionXLImg2ImgPipeline` for the refiner, config=testdata/tiny-sdxl-refiner) load
     exactly the folders' weights, really from the file, and produce the same outputs as
     `from_pretrained` for pipeline cases of make_sdxl.py (base, refiner img2img, base + refiner):
     bit for bit once both pipelines' weights are in freshly allocated memory, within 1e-5 as
     loaded (see `reallocate`);
  3. for the real-shaped key lists: diffusers' convert_* functions map the original names back to
     exactly the state_dict names and shapes of the models built (on the meta device, no weights)
     from SDXL's real configs, which are read from the Rust crate's bundled copies
     (crates/sdgen/src/loading/single_file/sdxl*/), and infer_diffusers_model_type names them
     "xl_base" / "xl_refiner".
The tiny files are not recognised by diffusers' infer_diffusers_model_type (its SDXL marker is bigG's
10th layer; the tiny bigG has 3), which is why they are loaded with `config=` (and in Rust with
`--config-from`).

Run `python tools/reference/make_single_file_sdxl.py` after make_sdxl.py (it reads testdata/tiny-sdxl/
and testdata/tiny-sdxl-refiner/). Deterministic: re-running rewrites byte-identical files.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd15 import setup_determinism  # noqa: E402
from make_sdxl import PIPELINE_CASES, run_case  # noqa: E402
from make_single_file import UNET_PREFIX, VAE_PREFIX, is_vae_attn_matrix, same_tensors, unet_to_ldm, vae_to_ldm  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BASE_DIR = REPO / "testdata" / "tiny-sdxl"
REFINER_DIR = REPO / "testdata" / "tiny-sdxl-refiner"
OUT_DIR = REPO / "testdata" / "tiny-sdxl-single"
BUNDLED = REPO / "crates" / "sdgen" / "src" / "loading" / "single_file"

CLIP_PREFIX = "conditioner.embedders.0.transformer."
# OpenCLIP bigG's prefix: the base's second embedder, the refiner's only one.
BIG_G_PREFIX = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
COMPONENTS = {
    "base": ["text_encoder", "text_encoder_2", "unet", "vae"],
    "refiner": ["text_encoder_2", "unet", "vae"],
}
FILES = {
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
}


# ---------------------------------------------------------------------------------------------
# diffusers -> original names
# ---------------------------------------------------------------------------------------------

# diffusers' DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"].
ADD_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}


def sdxl_unet_to_ldm(key: str, cfg: dict) -> str:
    for new, old in ADD_EMBEDDING.items():
        if key.startswith(new):
            return old + key[len(new):]
    return unet_to_ldm(key, cfg)


# transformers' CLIPEncoderLayer -> OpenCLIP's ResidualAttentionBlock leaves
# (DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]).
OPEN_CLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]
OPEN_CLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def to_open_clip(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """CLIPTextModelWithProjection's state dict in OpenCLIP's names; and for each original key the
    diffusers names it holds (three for a fused q/k/v)."""
    out, names, fused = {}, {}, {}

    def put(key, value, diffusers_names):
        assert key not in out, f"two tensors map to {key}"
        out[key], names[key] = value, diffusers_names

    for k, v in sd.items():
        if k in OPEN_CLIP_FIXED:
            put(OPEN_CLIP_FIXED[k], v, [k])
        elif k == "text_projection.weight":
            put("text_projection", v.T.contiguous(), [k])
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            fused.setdefault((int(m[1]), m[3]), {})[m[2]] = (k, v)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.*)", k):
            rest = m[2]
            for new, old in OPEN_CLIP_LAYER:
                if rest.startswith(new):
                    put(f"transformer.resblocks.{m[1]}.{old}{rest[len(new):]}", v, [k])
                    break
            else:
                raise SystemExit(f"OpenCLIP: {k} has no original name")
        else:
            raise SystemExit(f"OpenCLIP: {k} has no original name")
    for (layer, kind), qkv in sorted(fused.items()):
        parts = [qkv[p] for p in "qkv"]
        put(f"transformer.resblocks.{layer}.attn.in_proj_{kind}", torch.cat([v for _, v in parts]), [k for k, _ in parts])
    return out, names


def to_sgm(kind: str, folder: dict[str, dict[str, torch.Tensor]], unet_cfg: dict, vae_cfg: dict):
    """The folder's models as one sgm state dict; and for each original key, its component and
    diffusers name(s)."""
    out, origin = {}, {}

    def put(key, value, component, diffusers_names):
        assert key not in out, f"two tensors map to {key}"
        out[key], origin[key] = value, (component, diffusers_names)

    for k, v in folder["unet"].items():
        put(UNET_PREFIX + sdxl_unet_to_ldm(k, unet_cfg), v, "unet", [k])
    for k, v in folder["vae"].items():
        ldm = VAE_PREFIX + vae_to_ldm(k, vae_cfg)
        put(ldm, v[:, :, None, None] if is_vae_attn_matrix(ldm) else v, "vae", [k])
    if "text_encoder" in folder:
        for k, v in folder["text_encoder"].items():
            assert k.startswith("text_model."), k
            put(CLIP_PREFIX + k, v, "text_encoder", [k])
    big_g, names = to_open_clip(folder["text_encoder_2"])
    for k, v in big_g.items():
        put(BIG_G_PREFIX[kind] + k, v, "text_encoder_2", names[k])
    return out, origin


def extras(kind: str, meta: bool = False) -> dict[str, torch.Tensor]:
    """What the released files hold besides the models' weights: the ViT-L's position_ids buffer
    (int64 [1, 77]) and OpenCLIP's logit_scale (a training-only scalar). Loaders ignore both."""
    device = "meta" if meta else "cpu"
    out = {BIG_G_PREFIX[kind] + "logit_scale": torch.tensor(math.log(1 / 0.07), device=device)}
    if kind == "base":
        out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77, device=device)[None]
    return out


# ---------------------------------------------------------------------------------------------
# Checks against diffusers
# ---------------------------------------------------------------------------------------------


def diffusers_view(kind: str, ckpt: dict, unet_cfg: dict, vae_cfg: dict, big_g_model) -> dict[str, dict]:
    """What diffusers' single-file loader makes of `ckpt`, per component (the ViT-L's position_ids
    buffer left out: transformers 5 does not keep it)."""
    view = {
        "unet": convert_ldm_unet_checkpoint(ckpt, unet_cfg),
        "vae": convert_ldm_vae_checkpoint(ckpt, vae_cfg),
        "text_encoder_2": convert_open_clip_checkpoint(big_g_model, ckpt, prefix=BIG_G_PREFIX[kind]),
    }
    if kind == "base":
        clip = convert_ldm_clip_checkpoint(ckpt)
        view["text_encoder"] = {k: v for k, v in clip.items() if not k.endswith("position_ids")}
    return view


def load_folder(folder: Path, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for comp in COMPONENTS[kind]:
        with safe_open(str(folder / FILES[comp]), "pt") as f:
            out[comp] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def read_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


PIPELINE_CLASS = {"base": StableDiffusionXLPipeline, "refiner": StableDiffusionXLImg2ImgPipeline}
FOLDER = {"base": BASE_DIR, "refiner": REFINER_DIR}
# One tensor per model changed in a copy of the file, and how many diffusers tensors that changes:
# the fused q/k/v bias is three.
PROBES = {
    "unet": (UNET_PREFIX + "label_emb.0.2.bias", 1),
    "vae": (VAE_PREFIX + "decoder.mid.attn_1.q.weight", 1),
    "text_encoder": (CLIP_PREFIX + "text_model.final_layer_norm.bias", 1),
    "text_encoder_2": ("transformer.resblocks.1.attn.in_proj_bias", 3),
    "text_encoder_2 projection": ("text_projection", 1),
}


def single_file_pipeline(kind: str, path: Path):
    pipe = PIPELINE_CLASS[kind].from_single_file(
        str(path), config=str(FOLDER[kind]), local_files_only=True, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def check_loading(kind: str, path: Path, folder_pipe) -> None:
    """from_single_file loads exactly the folder's weights, and really from the file."""
    single = single_file_pipeline(kind, path)
    for comp in COMPONENTS[kind]:
        same_tensors(f"{kind} from_single_file {comp}", getattr(single, comp).state_dict(),
                     getattr(folder_pipe, comp).state_dict())
    assert type(single.scheduler) is type(folder_pipe.scheduler)
    assert dict(single.scheduler.config) == dict(folder_pipe.scheduler.config)
    ckpt = read_file(path)
    probes = {name: (key if key.startswith(("model.", "first_stage", "conditioner.")) else BIG_G_PREFIX[kind] + key, n)
              for name, (key, n) in PROBES.items() if name.split()[0] in COMPONENTS[kind]}
    for key, _ in probes.values():
        ckpt[key] = ckpt[key] + 1.0
    with tempfile.TemporaryDirectory() as tmp:
        changed_path = Path(tmp) / "changed.safetensors"
        save_file(ckpt, str(changed_path))
        changed = single_file_pipeline(kind, changed_path)
        for name in probes:
            comp = name.split()[0]
            a, b = getattr(changed, comp).state_dict(), getattr(folder_pipe, comp).state_dict()
            differ = sum(not torch.equal(a[k], b[k]) for k in b)
            # Both probes of text_encoder_2 are in the same copy.
            want = sum(n for p, (_, n) in probes.items() if p.split()[0] == comp)
            assert differ == want, f"{kind} {name}: {differ} tensors differ, not {want}: not loaded from the file?"
    print(f"  {kind}: from_single_file loads the folder's weights, from the file")
    return single


def max_difference(name: str, a: dict, b: dict) -> float:
    """The largest difference of any output, relative to that output's largest magnitude."""
    assert a["tensors"].keys() == b["tensors"].keys(), name
    assert a["info"] == b["info"], f"{name}: run info differs"
    return max(float((a["tensors"][k] - b["tensors"][k]).abs().max() / b["tensors"][k].abs().max().clamp(min=1e-30))
               for k in a["tensors"])


def reallocate(pipe) -> None:
    """Moves every weight into freshly allocated memory. diffusers copies the tensors it splits
    (q/k/v) and transposes (text_projection) out of the file, while from_pretrained's stay as
    read; the CPU matmul kernels round differently (by ~2e-7) on the two, so outputs are only
    comparable bit for bit once both pipelines' weights are copies."""
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae"):
        for p in getattr(pipe, comp, None).parameters() if getattr(pipe, comp, None) is not None else []:
            p.data = p.data.clone()


# Cases of make_sdxl.py run through both: the base alone (batch 1, and batch 2 non-square), the
# refiner alone (img2img), and the base handing off to the refiner.
CASES = ("base", "base_batch2_nonsquare", "refiner_img2img", "ensemble")
# Single file vs folder before the weights are reallocated (see `reallocate`), relative to each
# output's largest magnitude; the project's pipeline tolerance is far coarser (1/255 per channel).
AS_LOADED_RTOL = 1e-5


@torch.no_grad()
def check_images(paths: dict[str, Path]) -> None:
    folders = {}
    for kind in ("base", "refiner"):
        folders[kind] = PIPELINE_CLASS[kind].from_pretrained(FOLDER[kind], torch_dtype=torch.float32)
        folders[kind].set_progress_bar_config(disable=True)
    singles = {kind: check_loading(kind, paths[kind], folders[kind]) for kind in ("base", "refiner")}
    cases = {c["name"]: c for c in PIPELINE_CASES}
    wants = {}
    for name in CASES:
        wants[name] = run_case(folders["base"], folders["refiner"], cases[name])
        diff = max_difference(name, run_case(singles["base"], singles["refiner"], cases[name]), wants[name])
        assert diff <= AS_LOADED_RTOL, f"{name}: single file and folder differ by {diff}"
        print(f"  {name} ({cases[name]['kind']}): as loaded, single file vs folder max |diff| / max|ref| {diff:.1e}")
    for pipe in [*folders.values(), *singles.values()]:
        reallocate(pipe)
    for name in CASES:
        want = run_case(folders["base"], folders["refiner"], cases[name])
        diff = max_difference(name, run_case(singles["base"], singles["refiner"], cases[name]), want)
        assert diff == 0, f"{name}: single file and folder differ by {diff} with the same weights in the same memory"
        print(f"  {name}: reallocated, single-file outputs == folder outputs, bit for bit "
              f"(folder before/after reallocation: {max_difference(name, want, wants[name]):.1e})")


# ---------------------------------------------------------------------------------------------
# Real-shaped key lists
# ---------------------------------------------------------------------------------------------


def bundled_config(kind: str, component: str) -> dict:
    # The refiner's folder bundles only what differs from the base's.
    own = BUNDLED / ("sdxl" if kind == "base" else "sdxl-refiner") / component / "config.json"
    return json.loads((own if own.is_file() else BUNDLED / "sdxl" / component / "config.json").read_text())


def real_models(kind: str):
    """The real models' state dicts (meta tensors), built from the bundled configs."""
    unet_cfg, vae_cfg = bundled_config(kind, "unet"), bundled_config(kind, "vae")
    te2_cfg = bundled_config(kind, "text_encoder_2")
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(unet_cfg),
            "vae": AutoencoderKL.from_config(vae_cfg),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(te2_cfg)),
        }
        if kind == "base":
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_dict(bundled_config(kind, "text_encoder")))
    sd = {comp: dict(m.state_dict()) for comp, m in models.items()}
    sd["text_encoder_2"] = {k: v for k, v in sd["text_encoder_2"].items() if not k.endswith("position_ids")}
    if kind == "base":
        # The hub's (transformers 4) names: `text_model.` prefix (transformers >= 5.6 drops it).
        sd["text_encoder"] = {("" if k.startswith("text_model.") else "text_model.") + k: v
                              for k, v in sd["text_encoder"].items() if not k.endswith("position_ids")}
    return sd, unet_cfg, vae_cfg, models["text_encoder_2"]


def real_key_list(kind: str) -> dict:
    """A real SDXL checkpoint's tensor names/shapes/dtypes (no weights), each with where diffusers
    puts it."""
    sd, unet_cfg, vae_cfg, big_g = real_models(kind)
    ckpt, origin = to_sgm(kind, sd, unet_cfg, vae_cfg)
    ckpt.update(extras(kind, meta=True))
    assert infer_diffusers_model_type(ckpt) == f"xl_{kind}", infer_diffusers_model_type(ckpt)
    view = diffusers_view(kind, ckpt, unet_cfg, vae_cfg, big_g)
    for comp in sd:
        same_tensors(f"real {kind} {comp}", view[comp], sd[comp], values=False)
    assert sum(len(n) for _, n in origin.values()) == sum(len(v) for v in sd.values())
    # The released files are f16 (6.9 GB for the base's 3.5 G parameters), but for position_ids.
    dtypes = {torch.float32: "F16", torch.float16: "F16", torch.int64: "I64"}
    out = {}
    for key, v in sorted(ckpt.items()):
        entry = [dtypes[v.dtype], list(v.shape)]
        if key in origin:
            comp, names = origin[key]
            diffusers_shape = list(sd[comp][names[0]].shape)
            entry += [comp, names[0] if len(names) == 1 else names]
            if diffusers_shape != entry[1]:
                entry.append(diffusers_shape)
        out[key] = entry
    return out


README = """\
# tiny-sdxl-single/ (tools/reference/make_single_file_sdxl.py)

- `tiny-sdxl-base.safetensors`, `tiny-sdxl-refiner.safetensors`: ../tiny-sdxl/ and
  ../tiny-sdxl-refiner/ as single files in Stability's original ("sgm") layout, f32:
  `model.diffusion_model.*` (UNet, ldm names, the added embedding as `label_emb.0.{{0,2}}`),
  `first_stage_model.*` (VAE, mid-attention q/k/v/proj_out as 1x1 convolutions),
  `conditioner.embedders.0.transformer.text_model.*` (base: CLIP ViT-L, with the int64
  `position_ids`) and OpenCLIP bigG as `conditioner.embedders.1.model.*` (base) /
  `conditioner.embedders.0.model.*` (refiner): fused `attn.in_proj_weight`/`in_proj_bias` for q/k/v,
  `text_projection` stored transposed, and the unused `logit_scale`. diffusers'
  `from_single_file(file, config="testdata/tiny-sdxl")` (`StableDiffusionXLImg2ImgPipeline`,
  config="testdata/tiny-sdxl-refiner" for the refiner) loads exactly the folders' tensors, and for
  the cases base, base_batch2_nonsquare, refiner_img2img and ensemble of
  ../reference/sdxl/pipeline.json gives the folders' outputs bit for bit once both pipelines'
  weights sit in freshly allocated memory, and within 4e-6 of them (relative to each output's
  largest magnitude) as loaded: diffusers copies the q/k/v pieces and the transposed projection
  out of the file, and torch's CPU matmuls round differently (~2e-7) on a copy of a weight than
  on the weight as read; the folder's own outputs move as much when its weights are copied
  (checked by the script). So those references hold for these files to that precision. The tiny
  bigG has 3 layers, not 32: diffusers' `infer_diffusers_model_type` (whose SDXL markers are
  bigG's 10th layer) does not recognise them, so they are opened with a config folder.
- `sdxl-base-real-keys.json` ({base_n} tensors, {base_m} of the models) and
  `sdxl-refiner-real-keys.json` ({refiner_n}, {refiner_m}): the tensors of the released
  sd_xl_base_1.0.safetensors / sd_xl_refiner_1.0.safetensors (f16), built without weights from
  SDXL's real configs (the Rust crate's bundled copies): name -> [dtype, shape] for the extras
  (`position_ids`, `logit_scale`), name -> [dtype, shape, component, diffusers name] for model
  tensors, the diffusers name a list of three for a fused q/k/v, and a fifth element, the
  diffusers shape, where it differs from the stored one (q/k/v pieces, `text_projection`, the
  VAE's 1x1 convolutions). Where diffusers' convert_ldm_unet/vae/clip_checkpoint and
  convert_open_clip_checkpoint put each (checked by the script).
"""


def main() -> None:
    setup_determinism()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in ("base", "refiner"):
        folder_dir = FOLDER[kind]
        unet_cfg = json.loads((folder_dir / "unet" / "config.json").read_text())
        vae_cfg = json.loads((folder_dir / "vae" / "config.json").read_text())
        folder = load_folder(folder_dir, kind)
        ckpt, _ = to_sgm(kind, folder, unet_cfg, vae_cfg)
        ckpt.update(extras(kind))
        path = OUT_DIR / f"tiny-sdxl-{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in sorted(ckpt.items())}, str(path), metadata={"format": "pt"})
        print(f"wrote {path.relative_to(REPO)}: {len(ckpt)} tensors, {path.stat().st_size} bytes")
        paths[kind] = path

        # 1. diffusers' conversion of the file gives back the folder's tensors.
        written = read_file(path)
        big_g = CLIPTextModelWithProjection.from_pretrained(folder_dir / "text_encoder_2")
        view = diffusers_view(kind, written, unet_cfg, vae_cfg, big_g)
        assert view.keys() == folder.keys()
        for comp in folder:
            same_tensors(f"{kind} convert {comp}", view[comp], folder[comp])
        print(f"  {kind}: diffusers' convert_* give back the folder's tensors "
              f"(infer_diffusers_model_type: {infer_diffusers_model_type(written)!r})")

    # 2. Same weights and outputs through from_single_file.
    check_images(paths)

    # 3. The real-shaped key lists.
    counts = {}
    for kind in ("base", "refiner"):
        real = real_key_list(kind)
        out = OUT_DIR / f"sdxl-{kind}-real-keys.json"
        out.write_text(json.dumps(real, separators=(",", ":")) + "\n", encoding="utf-8")
        counts[f"{kind}_n"], counts[f"{kind}_m"] = len(real), sum(len(v) > 2 for v in real.values())
        print(f"wrote {out.relative_to(REPO)}: {len(real)} tensors, {out.stat().st_size} bytes")
    (OUT_DIR / "README.md").write_text(README.format(**counts), encoding="utf-8")


if __name__ == "__main__":
    main()
