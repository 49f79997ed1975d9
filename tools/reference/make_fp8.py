#!/usr/bin/env python3
"""Writes tiny fp8-scaled single files in ComfyUI's layout, and what torch makes of them, for
crates/sdgen/tests/fp8.rs.

Writes (relative to the repository root):
  testdata/tiny-sd35-single/tiny-sd35-large-fp8-scaled.safetensors
      tiny-sd35-large.safetensors with the MMDiT's linear weights in fp8 (beside its
      text_encoders/, like the 16-bit file)
  testdata/tiny-sd15-single/tiny-sd15-fp8-scaled.safetensors
      tiny-sd15.safetensors with the UNet's linear weights in fp8
  testdata/fp8/reference.safetensors
      - `bytes.weight`: every E4M3 byte ([16, 16], 0x00..0xff), `bytes.scale_weight` its scale, and
        `bytes.f32` / `bytes.bf16` / `bytes.f16`: torch's `weight.to(dtype) * scale.to(dtype)`;
      - `quantise.source` (values of many magnitudes, f32) and `quantise.weight` /
        `quantise.scale_weight`: the rule below applied by torch;
      - `qkv.f32` / `qkv.bf16`: the fp8 file's `joint_blocks.0.x_block.attn.qkv.weight`
        dequantised (the fused q/k/v: the loader serves it as three matrices);
      - `mmdit.latents` [2, 16, 8, 8], `mmdit.timesteps` [2], `mmdit.context` [2, 7, 64],
        `mmdit.pooled` [2, 40] (seeded) and `mmdit.fp8_out`: SD3Transformer2DModel's forward on the
        fp8 file's dequantised weights (f32), `mmdit.f32_out` on the 16-bit file's;
  testdata/fp8/t5xxl_fp8_e4m3fn_scaled.safetensors, testdata/fp8/t5xxl_fp8_e4m3fn.safetensors
      the tiny T5 encoder beside tiny-sd35-large.safetensors (text_encoders/t5xxl_fp16.safetensors)
      as ComfyUI's standalone T5 files: its linear weights (attention q/k/v/o, the gated MLP's
      wi_0/wi_1/wo) in fp8, with a `scale_weight` each and the top-level `scaled_fp8` marker, the
      embeddings and norms as they were; or (plain) every tensor cast to fp8 at scale 1, norms and
      embedding tables too, as in the published plain file;
  testdata/fp8/t5_reference.safetensors
      `t5.ids` [1, 8] and transformers' T5EncoderModel forward (f32) on each file's dequantised
      weights: `t5.scaled_out`, `t5.plain_out`, and `t5.f32_out` on the 16-bit file's;
  testdata/fp8/README.md

The layout, as ComfyUI reads it (comfy/model_detection.py, comfy/ops.py `scaled_fp8_ops`):
  - `model.diffusion_model.scaled_fp8`: the marker, an E4M3 tensor of 2 elements (its dtype is the
    weights' fp8 type; 2 elements: no fp8 matrix products);
  - a quantised linear layer's `<layer>.weight` in float8_e4m3fn and `<layer>.scale_weight`, an f32
    scalar; the weight it multiplies is `weight.to(dtype) * scale_weight.to(dtype)`.
Which weights: the stored 2-D `.weight`s of the denoiser (what ComfyUI builds as Linear layers,
so SD 1.5's 1x1-convolution projections stay dense), except the embeddings and the first and last
layers, as `--weights` quantises (sdgen's loading/quantise.rs: city96's rule). The rule: scale =
max|W| / 448 (float32), W / scale clamped to +-448 and cast to float8_e4m3fn (round to nearest
even), the per-tensor rule of the fp8-scaled converters; an all-zero tensor gets scale 1.
Everything else keeps the source's values. So `--weights fp8` on the 16-bit SD 3.5 file gives
this file's bytes.

Checks (the script stops on failure): the fp8 files' dequantised weights are within half an E4M3
step (2^-4 relative) of the source, and the forward runs on the folder's config.

Run `python tools/reference/make_fp8.py` after make_single_file_sd3.py and make_single_file.py.
Deterministic.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata" / "fp8"
PREFIX = "model.diffusion_model."
E4M3_MAX = 448.0

# What stays dense, under the original names (quantise.rs's rule, in ldm/SAI names).
KEEP = {
    "sd3": ["t_embedder.", "y_embedder.", "context_embedder.", "x_embedder.", "pos_embed", "final_layer."],
    "sd1": ["time_embed.", "label_emb.", "input_blocks.0.0.", "out.2."],
}


def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    absmax = w.abs().max()
    scale = absmax / E4M3_MAX if absmax > 0 else torch.tensor(1.0)
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(()).to(torch.float32)


def dequantise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)


def to_fp8_scaled(src: Path, dst: Path, arch: str) -> dict[str, torch.Tensor]:
    sd = load_file(str(src))
    out: dict[str, torch.Tensor] = {}
    count = 0
    for k, v in sd.items():
        rest = k[len(PREFIX):]
        if k.startswith(PREFIX) and k.endswith(".weight") and v.ndim == 2 and not any(rest.startswith(p) for p in KEEP[arch]):
            q, s = quantise(v)
            back = dequantise(q, s, torch.float32)
            # Half an E4M3 step of the value (3 mantissa bits), or of the smallest normal.
            tol = torch.maximum(v.abs(), torch.tensor(2.0 ** -6) * s) * 2.0 ** -4 + 1e-12
            if not torch.all((back - v).abs() <= tol):
                sys.exit(f"{dst.name}: {k} is not within half an E4M3 step")
            out[k] = q
            out[k[: -len("weight")] + "scale_weight"] = s
            count += 1
        else:
            out[k] = v
    out[PREFIX + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(out, str(dst))
    print(f"{dst.relative_to(ROOT)}: {count} fp8 weights")
    return out


def dequantised_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file as f32 weights, each fp8 one times its scale (1 in a plain fp8 file: what a
    forward multiplies)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("scale_weight") or k.endswith("scaled_fp8"):
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight", torch.tensor(1.0))
        out[k] = dequantise(v, scale, torch.float32) if v.dtype == torch.float8_e4m3fn else v
    return out


@torch.no_grad()
def mmdit_forward(ckpt: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mmdit.safetensors"
        save_file(ckpt, str(path))
        model = SD3Transformer2DModel.from_single_file(str(path), config=str(ROOT / "testdata" / "tiny-sd35-large"),
                                                       subfolder="transformer", local_files_only=True,
                                                       torch_dtype=torch.float32)
    return model(hidden_states=inputs["latents"], timestep=inputs["timesteps"],
                 encoder_hidden_states=inputs["context"], pooled_projections=inputs["pooled"]).sample


T5_SOURCE = ROOT / "testdata" / "tiny-sd35-single" / "text_encoders" / "t5xxl_fp16.safetensors"
T5_CONFIG = ROOT / "testdata" / "tiny-sd35-large" / "text_encoder_3"
# T5's linear layers, which ComfyUI's fp8 T5 files hold in fp8 (its scaled ops replace Linear only).
T5_LINEARS = tuple(f".{n}.weight" for n in ("q", "k", "v", "o", "wi_0", "wi_1", "wo"))


def t5_fp8(scaled: bool) -> dict[str, torch.Tensor]:
    """The tiny T5 as ComfyUI's `t5xxl_fp8_e4m3fn_scaled.safetensors` (scaled: the linear weights)
    or `t5xxl_fp8_e4m3fn.safetensors` (plain: every tensor cast to fp8 as it is, as that file
    holds even its layer norms in F8_E4M3)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in load_file(str(T5_SOURCE)).items():
        if not scaled:
            out[k] = v.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        elif k.endswith(T5_LINEARS):
            out[k], out[k[: -len("weight")] + "scale_weight"] = quantise(v)
        else:
            out[k] = v
    if scaled:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    name = "t5xxl_fp8_e4m3fn_scaled.safetensors" if scaled else "t5xxl_fp8_e4m3fn.safetensors"
    save_file(out, str(OUT / name))
    print(f"{(OUT / name).relative_to(ROOT)}: {sum(v.dtype == torch.float8_e4m3fn for v in out.values())} fp8 tensors")
    return out


@torch.no_grad()
def t5_forward(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config.from_pretrained(str(T5_CONFIG))).float().eval()
    missing, unexpected = model.load_state_dict(dequantised_file(sd), strict=False)
    if unexpected or set(missing) - {"encoder.embed_tokens.weight"}:
        sys.exit(f"the tiny T5's weights do not fit its config: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model(input_ids=ids).last_hidden_state


def main() -> None:
    torch.manual_seed(15)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    large = ROOT / "testdata" / "tiny-sd35-single" / "tiny-sd35-large.safetensors"
    fp8_large = to_fp8_scaled(large, large.with_name("tiny-sd35-large-fp8-scaled.safetensors"), "sd3")
    sd15 = ROOT / "testdata" / "tiny-sd15-single" / "tiny-sd15.safetensors"
    to_fp8_scaled(sd15, sd15.with_name("tiny-sd15-fp8-scaled.safetensors"), "sd1")

    ref: dict[str, torch.Tensor] = {}
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    scale = torch.tensor(0.0123, dtype=torch.float32)
    ref["bytes.weight"], ref["bytes.scale_weight"] = every, scale
    for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
        ref[f"bytes.{name}"] = dequantise(every, scale, dtype)
    source = torch.randn(64, 48) * torch.logspace(-6, 1, 48)
    source[3, 5] = -17.25  # the largest magnitude, negative
    ref["quantise.source"] = source
    ref["quantise.weight"], ref["quantise.scale_weight"] = quantise(source)
    qkv = PREFIX + "joint_blocks.0.x_block.attn.qkv."
    ref["qkv.f32"] = dequantise(fp8_large[qkv + "weight"], fp8_large[qkv + "scale_weight"], torch.float32)
    ref["qkv.bf16"] = dequantise(fp8_large[qkv + "weight"], fp8_large[qkv + "scale_weight"], torch.bfloat16)

    inputs = {
        "latents": torch.randn(2, 16, 8, 8),
        "timesteps": torch.tensor([500.0, 20.0]),
        "context": torch.randn(2, 7, 64),
        "pooled": torch.randn(2, 40),
    }
    for k, v in inputs.items():
        ref[f"mmdit.{k}"] = v
    mmdit = {k: v for k, v in dequantised_file(fp8_large).items() if k.startswith(PREFIX)}
    ref["mmdit.fp8_out"] = mmdit_forward(mmdit, inputs)
    ref["mmdit.f32_out"] = mmdit_forward({k: v for k, v in load_file(str(large)).items() if k.startswith(PREFIX)}, inputs)
    diff = (ref["mmdit.fp8_out"] - ref["mmdit.f32_out"]).norm() / ref["mmdit.f32_out"].norm()
    print(f"MMDiT forward, fp8 against f32 weights (torch): relative L2 {diff:.3e}")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(OUT / "reference.safetensors"))

    ids = torch.tensor([[3, 17, 5, 42, 250, 1, 0, 0]])
    t5 = {"t5.ids": ids, "t5.f32_out": t5_forward(load_file(str(T5_SOURCE)), ids)}
    for scaled, key in ((True, "t5.scaled_out"), (False, "t5.plain_out")):
        t5[key] = t5_forward(t5_fp8(scaled), ids)
        diff = (t5[key] - t5["t5.f32_out"]).norm() / t5["t5.f32_out"].norm()
        print(f"T5 forward, {key[3:-4]} fp8 against f32 weights (torch): relative L2 {diff:.3e}")
    save_file({k: v.contiguous() for k, v in t5.items()}, str(OUT / "t5_reference.safetensors"))
    (OUT / "README.md").write_text(
        "Reference data for fp8 weights written by tools/reference/make_fp8.py (torch's float8_e4m3fn, ComfyUI's\n"
        "scaled-fp8 layout); the fp8 single files themselves sit beside their 16-bit ones in\n"
        "../tiny-sd35-single/ and ../tiny-sd15-single/; the tiny T5 as ComfyUI's standalone fp8 T5 files\n"
        "(t5xxl_fp8_e4m3fn_scaled.safetensors, t5xxl_fp8_e4m3fn.safetensors) and its forwards\n"
        "(t5_reference.safetensors) are here. Read the script's docstring for what each tensor is.\n"
        "Used by crates/sdgen/tests/fp8.rs.\n"
    )


if __name__ == "__main__":
    main()
