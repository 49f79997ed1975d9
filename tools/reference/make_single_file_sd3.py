#!/usr/bin/env python3
"""Writes the tiny SD 3.5 Large and Medium as single-file checkpoints in Stability's layout (the
files of stabilityai/stable-diffusion-3.5-large and -medium: `sd3.5_large.safetensors` with a
`text_encoders/` folder beside it, and ComfyUI's `*_incl_clips_t5xxl*` files with everything in
one), and the key lists of the real MMDiTs, for crates/sdgen/tests/sd3_single_file.rs.

Writes (relative to the repository root):
  testdata/tiny-sd35-single/tiny-sd35-large.safetensors   testdata/tiny-sd35-large/ in one file, the
                                                          three text encoders inside
  testdata/tiny-sd35-single/tiny-sd35-medium.safetensors  testdata/tiny-sd35-medium/'s MMDiT-X and VAE
  testdata/tiny-sd35-single/text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors
                                                          the (shared) text encoders, beside them
  testdata/tiny-sd35-single/sd35-{large,medium}-real-keys.json
                                                          the real MMDiTs' tensors: SAI name -> [dtype,
                                                          shape, diffusers name(s), diffusers shape?]
  testdata/tiny-sd35-single/README.md

The layout (SAI's sd3_impls / ComfyUI state dict):
  model.diffusion_model.*   the MMDiT: `x_embedder.proj`, `pos_embed` [1, max², width],
                            `t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}`, `context_embedder`,
                            `joint_blocks.N.{x_block,context_block}.{attn.{qkv,proj,ln_q,ln_k},
                            adaLN_modulation.1, mlp.{fc1,fc2}}`, MMDiT-X's `x_block.attn2.*`,
                            `final_layer.{linear,adaLN_modulation.1}`; q, k and v fused into one
                            `qkv` [3W, W]; the last block's context_block (which only feeds the
                            attention) and final_layer hold their modulation as (shift, scale),
                            diffusers' AdaLayerNormContinuous as (scale, shift)
  first_stage_model.*       the VAE, in ldm's names (as SD 1.x / SDXL)
  text_encoders.clip_l.transformer.*, text_encoders.clip_g.transformer.*
                            the CLIPs, in transformers' names (`text_model.*`, `text_projection.weight`)
  text_encoders.t5xxl.transformer.*
                            T5-XXL's encoder, in transformers' names (`shared.weight`, `encoder.*`)
The text_encoders/ files hold the same tensors without the `text_encoders.<name>.transformer.` prefix.

The mapping diffusers -> SAI is the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint` and `convert_sd3_t5_checkpoint_to_diffusers`
(loaders/single_file_utils.py), written out here. It is checked, and the script stops on failure:
  1. diffusers' own convert_* functions, run on the written files, give back exactly the folders'
     tensors (names, shapes, values); the text_encoders/ files hold exactly the folders' tensors;
  2. `SD3Transformer2DModel.from_single_file` and `AutoencoderKL.from_single_file` (config= the
     tiny folder) load exactly the folder's weights from the file, and a StableDiffusion3Pipeline
     built from them gives the folder pipeline's images for the cases large, large_no_t5 and
     medium of make_sd3.py (testdata/reference/sd3/pipeline.*). (diffusers' pipeline-level
     from_single_file would replace CLIP-L's projection by an identity, which the tiny CLIP-L,
     whose projection is not square, cannot take: the encoders are checked by their tensors.)
  3. for the real-shaped key lists: diffusers' convert function maps the SAI names back to exactly
     the state_dict names and shapes of the SD3Transformer2DModel built (on the meta device) from
     the real configs bundled in the Rust crate, and infer_diffusers_model_type names them
     "sd35_large" / "sd35_medium".

Run `python tools/reference/make_single_file_sd3.py` after make_sd3.py. Deterministic: re-running
rewrites byte-identical files.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_sd3_t5_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd15 import setup_determinism  # noqa: E402
from make_sd3 import CASES, run_case  # noqa: E402
from make_single_file import VAE_PREFIX, is_vae_attn_matrix, same_tensors, vae_to_ldm  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FOLDER = {"large": REPO / "testdata" / "tiny-sd35-large", "medium": REPO / "testdata" / "tiny-sd35-medium"}
OUT_DIR = REPO / "testdata" / "tiny-sd35-single"
BUNDLED = REPO / "crates" / "sdgen" / "src" / "loading" / "single_file" / "sd35"

MMDIT_PREFIX = "model.diffusion_model."
ENCODER_PREFIX = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
BESIDE = {"text_encoder": "clip_l.safetensors", "text_encoder_2": "clip_g.safetensors",
          "text_encoder_3": "t5xxl_fp16.safetensors"}
# Which encoders each file holds inside: Large as ComfyUI's all-in-one files, Medium as Stability's
# sd3.5_medium.safetensors, its encoders in text_encoders/.
INSIDE = {"large": True, "medium": False}


# ---------------------------------------------------------------------------------------------
# diffusers -> SAI names
# ---------------------------------------------------------------------------------------------

MMDIT_FIXED = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
    "norm_out.linear.": "final_layer.adaLN_modulation.1.",
}
# Per block: diffusers leaf -> (stream, SAI leaf). The q/k/v pieces are fused in `mmdit_to_sai`.
BLOCK_LEAVES = {
    "attn.norm_q.": ("x_block", "attn.ln_q."),
    "attn.norm_k.": ("x_block", "attn.ln_k."),
    "attn.norm_added_q.": ("context_block", "attn.ln_q."),
    "attn.norm_added_k.": ("context_block", "attn.ln_k."),
    "attn.to_out.0.": ("x_block", "attn.proj."),
    "attn.to_add_out.": ("context_block", "attn.proj."),
    "attn2.norm_q.": ("x_block", "attn2.ln_q."),
    "attn2.norm_k.": ("x_block", "attn2.ln_k."),
    "attn2.to_out.0.": ("x_block", "attn2.proj."),
    "norm1.linear.": ("x_block", "adaLN_modulation.1."),
    "norm1_context.linear.": ("context_block", "adaLN_modulation.1."),
    "ff.net.0.proj.": ("x_block", "mlp.fc1."),
    "ff.net.2.": ("x_block", "mlp.fc2."),
    "ff_context.net.0.proj.": ("context_block", "mlp.fc1."),
    "ff_context.net.2.": ("context_block", "mlp.fc2."),
}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): diffusers' `swap_scale_shift`, its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def mmdit_to_sai(sd: dict[str, torch.Tensor], num_layers: int):
    """SD3Transformer2DModel's state dict in SAI's names; and for each SAI key the diffusers names
    it holds (three for a fused q/k/v)."""
    out, names, fused = {}, {}, {}

    def put(key, value, diffusers_names):
        assert key not in out, f"two tensors map to {key}"
        out[key], names[key] = value, diffusers_names

    for k, v in sd.items():
        fixed = next((p for p in MMDIT_FIXED if k.startswith(p)), None)
        if fixed is not None:
            sai = MMDIT_FIXED[fixed] + k[len(fixed):]
            put(sai, swap_halves(v) if fixed == "norm_out.linear." else v, [k])
            continue
        assert k.startswith("transformer_blocks."), k
        block, rest = k[len("transformer_blocks."):].split(".", 1)
        i = int(block)
        m = re.fullmatch(r"(attn2?)\.(to|add)_([qkv])(?:_proj)?\.(weight|bias)", rest)
        if m:
            stream = "context_block" if m[2] == "add" else "x_block"
            fused.setdefault((i, stream, f"{m[1]}.qkv.", m[4]), {})[m[3]] = (k, v)
            continue
        leaf = next((p for p in BLOCK_LEAVES if rest.startswith(p)), None)
        if leaf is None:
            raise SystemExit(f"MMDiT: {k} has no SAI name")
        stream, sai_leaf = BLOCK_LEAVES[leaf]
        # The last block's context stream is diffusers' AdaLayerNormContinuous (context_pre_only).
        last_context_norm = leaf == "norm1_context.linear." and i == num_layers - 1
        put(f"joint_blocks.{i}.{stream}.{sai_leaf}{rest[len(leaf):]}", swap_halves(v) if last_context_norm else v, [k])
    for (i, stream, fused_name, kind), qkv in sorted(fused.items()):
        parts = [qkv[p] for p in "qkv"]
        put(f"joint_blocks.{i}.{stream}.{fused_name}{kind}", torch.cat([v for _, v in parts]), [k for k, _ in parts])
    return out, names


def to_sai(kind: str, folder: dict[str, dict[str, torch.Tensor]], cfg: dict, vae_cfg: dict, inside: bool):
    """The single file's tensors, and the text_encoders/ files' (empty when they are inside)."""
    out = {}

    def put(key, value):
        assert key not in out, f"two tensors map to {key}"
        out[key] = value

    mmdit, _ = mmdit_to_sai(folder["transformer"], cfg["num_layers"])
    for k, v in mmdit.items():
        put(MMDIT_PREFIX + k, v)
    for k, v in folder["vae"].items():
        ldm = VAE_PREFIX + vae_to_ldm(k, vae_cfg)
        put(ldm, v[:, :, None, None] if is_vae_attn_matrix(ldm) else v)
    beside = {}
    for comp in ENCODER_PREFIX:
        if inside:
            for k, v in folder[comp].items():
                put(ENCODER_PREFIX[comp] + k, v)
        else:
            beside[comp] = dict(folder[comp])
    return out, beside


# ---------------------------------------------------------------------------------------------
# Checks against diffusers
# ---------------------------------------------------------------------------------------------


def read_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_folder_component(folder: Path, comp: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((folder / comp).glob("*.safetensors")):
        out.update(read_file(f))
    return out


def diffusers_view(ckpt: dict, vae_cfg: dict) -> dict[str, dict]:
    """What diffusers' single-file conversion makes of `ckpt`, per component."""
    mmdit = {k: v for k, v in ckpt.items() if k.startswith(MMDIT_PREFIX)}
    view = {
        "transformer": convert_sd3_transformer_checkpoint_to_diffusers(mmdit),
        "vae": convert_ldm_vae_checkpoint(ckpt, vae_cfg),
    }
    if ENCODER_PREFIX["text_encoder"] + "text_model.final_layer_norm.weight" in ckpt:
        # convert_ldm_clip_checkpoint strips its own prefixes too (none of them here).
        view["text_encoder"] = convert_ldm_clip_checkpoint(ckpt, ENCODER_PREFIX["text_encoder"])
        view["text_encoder_2"] = convert_ldm_clip_checkpoint(ckpt, ENCODER_PREFIX["text_encoder_2"])
        view["text_encoder_3"] = convert_sd3_t5_checkpoint_to_diffusers(ckpt)
    return view


@torch.no_grad()
def check_models(kind: str, path: Path, folder_pipe) -> StableDiffusion3Pipeline:
    """from_single_file loads exactly the folder's MMDiT and VAE, and really from the file; a
    pipeline of them and the folder's encoders."""
    models = {}
    for comp, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL)):
        models[comp] = cls.from_single_file(str(path), config=str(FOLDER[kind]), subfolder=comp,
                                            local_files_only=True, torch_dtype=torch.float32)
        same_tensors(f"{kind} from_single_file {comp}", models[comp].state_dict(),
                     getattr(folder_pipe, comp).state_dict())
    # Really from the file: the final modulation changed in a copy of the file changes it alone.
    ckpt = read_file(path)
    key = MMDIT_PREFIX + "final_layer.adaLN_modulation.1.bias"
    ckpt[key] = ckpt[key] + 1.0
    changed_path = OUT_DIR / "changed.tmp.safetensors"
    save_file(ckpt, str(changed_path))
    try:
        changed = SD3Transformer2DModel.from_single_file(str(changed_path), config=str(FOLDER[kind]),
                                                         subfolder="transformer", local_files_only=True,
                                                         torch_dtype=torch.float32).state_dict()
    finally:
        changed_path.unlink()
    want = folder_pipe.transformer.state_dict()
    differ = [k for k in want if not torch.equal(changed[k], want[k])]
    assert differ == ["norm_out.linear.bias"], f"{kind}: {differ}: not loaded from the file?"
    print(f"  {kind}: SD3Transformer2DModel / AutoencoderKL.from_single_file load the folder's weights, from the file")
    pipe = StableDiffusion3Pipeline.from_pipe(folder_pipe, transformer=models["transformer"], vae=models["vae"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_difference(name: str, a: tuple, b: tuple) -> float:
    (ia, ta), (ib, tb) = a, b
    assert ta.keys() == tb.keys() and ia == ib, name
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


# ---------------------------------------------------------------------------------------------
# Real-shaped key lists
# ---------------------------------------------------------------------------------------------


def real_key_list(kind: str) -> dict:
    """The real MMDiT's SAI tensor names, shapes and dtypes (no weights), each with its diffusers
    name(s) and, where it differs, the diffusers shape."""
    cfg = json.loads((BUNDLED / kind / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(cfg)
    sd = dict(model.state_dict())
    sai, names = mmdit_to_sai(sd, cfg["num_layers"])
    ckpt = {MMDIT_PREFIX + k: v for k, v in sai.items()}
    assert infer_diffusers_model_type(ckpt) == f"sd35_{kind}", infer_diffusers_model_type(ckpt)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(ckpt))
    same_tensors(f"real {kind}", back, sd, values=False)
    out = {}
    for key, v in sorted(sai.items()):
        ns = names[key]
        entry = ["BF16" if kind == "large" else "F16", list(v.shape), ns[0] if len(ns) == 1 else ns]
        if list(sd[ns[0]].shape) != entry[1]:
            entry.append(list(sd[ns[0]].shape))
        out[MMDIT_PREFIX + key] = entry
    return out


README = """\
# tiny-sd35-single/ (tools/reference/make_single_file_sd3.py)

- `tiny-sd35-large.safetensors`: ../tiny-sd35-large/ in one file in Stability's layout, f32, with
  its three text encoders inside as ComfyUI's `*_incl_clips_t5xxl*` files hold them:
  `model.diffusion_model.*` (the MMDiT in SAI's names: fused `qkv`, `adaLN_modulation.1`, the last
  block's context modulation and `final_layer.adaLN_modulation.1` as (shift, scale)),
  `first_stage_model.*` (the VAE in ldm's names), `text_encoders.clip_l.transformer.*`,
  `text_encoders.clip_g.transformer.*`, `text_encoders.t5xxl.transformer.*` (transformers' names).
- `tiny-sd35-medium.safetensors`: ../tiny-sd35-medium/'s MMDiT-X (`x_block.attn2.*` in blocks 0
  and 1) and VAE, as Stability's `sd3.5_medium.safetensors`: no text encoders inside.
- `text_encoders/clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors`: the tiny
  encoders (the same in both folders) under transformers' names, as the repositories'
  `text_encoders/` folder holds them.
- diffusers' `SD3Transformer2DModel.from_single_file` and `AutoencoderKL.from_single_file`
  (config= the tiny folder) load exactly the folders' weights from these files, and a pipeline of
  them gives the folders' images for the cases large, large_no_t5 and medium of
  ../reference/sd3/pipeline.json ({diffs}); the encoders are exactly the folders' tensors. So those
  references hold for these files.
- `sd35-large-real-keys.json` ({large_n} tensors), `sd35-medium-real-keys.json` ({medium_n}): the
  MMDiT tensors of the released sd3.5_large.safetensors (bf16) / sd3.5_medium.safetensors (f16),
  built without weights from the real configs (the Rust crate's bundled copies): SAI name ->
  [dtype, shape, diffusers name (a list of three for a fused q/k/v), diffusers shape where it
  differs]. Where diffusers' convert_sd3_transformer_checkpoint_to_diffusers puts each (checked by
  the script, which also checks that infer_diffusers_model_type names them sd35_large /
  sd35_medium).
"""


def main() -> None:
    setup_determinism()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    (OUT_DIR / "text_encoders").mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind in ("large", "medium"):
        cfg = json.loads((FOLDER[kind] / "transformer" / "config.json").read_text())
        vae_cfg = json.loads((FOLDER[kind] / "vae" / "config.json").read_text())
        folder = {c: read_folder_component(FOLDER[kind], c) for c in ["transformer", "vae", *ENCODER_PREFIX]}
        ckpt, beside = to_sai(kind, folder, cfg, vae_cfg, INSIDE[kind])
        path = OUT_DIR / f"tiny-sd35-{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in sorted(ckpt.items())}, str(path), metadata={"format": "pt"})
        print(f"wrote {path.relative_to(REPO)}: {len(ckpt)} tensors, {path.stat().st_size} bytes")
        paths[kind] = path
        for comp, tensors in beside.items():
            out = OUT_DIR / "text_encoders" / BESIDE[comp]
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out), metadata={"format": "pt"})
            print(f"wrote {out.relative_to(REPO)}: {len(tensors)} tensors, {out.stat().st_size} bytes")

        # 1. diffusers' conversion of the file gives back the folder's tensors.
        written = read_file(path)
        view = diffusers_view(written, vae_cfg)
        for comp in ENCODER_PREFIX:
            if comp not in view:
                view[comp] = read_file(OUT_DIR / "text_encoders" / BESIDE[comp])
        assert view.keys() == folder.keys(), view.keys()
        for comp in folder:
            same_tensors(f"{kind} convert {comp}", view[comp], folder[comp])
        print(f"  {kind}: diffusers' convert_* give back the folder's tensors "
              f"(infer_diffusers_model_type: {infer_diffusers_model_type(written)!r})")

    # 2. Same weights, same images.
    folders = {kind: StableDiffusion3Pipeline.from_pretrained(FOLDER[kind], dtype=torch.float32) for kind in FOLDER}
    for pipe in folders.values():
        pipe.set_progress_bar_config(disable=True)
    singles = {kind: check_models(kind, paths[kind], folders[kind]) for kind in FOLDER}
    cases = {c["name"]: c for c in CASES}
    diffs = []
    for name in ("large", "large_no_t5", "medium"):
        case = cases[name]
        diff = max_difference(name, run_case(singles, case), run_case(folders, case))
        assert diff == 0, f"{name}: single file and folder differ by {diff}"
        diffs.append(f"{name} bit for bit")
        print(f"  {name}: single-file images == folder images, bit for bit")

    # 3. The real-shaped key lists.
    counts = {"diffs": ", ".join(diffs)}
    for kind in ("large", "medium"):
        real = real_key_list(kind)
        out = OUT_DIR / f"sd35-{kind}-real-keys.json"
        out.write_text(json.dumps(real, separators=(",", ":")) + "\n", encoding="utf-8")
        counts[f"{kind}_n"] = len(real)
        print(f"wrote {out.relative_to(REPO)}: {len(real)} tensors, {out.stat().st_size} bytes")
    (OUT_DIR / "README.md").write_text(README.format(**counts), encoding="utf-8")


if __name__ == "__main__":
    main()
