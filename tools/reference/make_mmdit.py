#!/usr/bin/env python3
"""Builds tiny random-weight SD 3 / 3.5 MMDiT denoisers and diffusers' outputs for them.

Writes (relative to the repository root):
  testdata/tiny-sd3-mmdit/large/      an SD3Transformer2DModel like SD 3.5 Large (RMS QK-norm),
                                      saved in two shards with an index, as the hub's file is
  testdata/tiny-sd3-mmdit/medium/     like SD 3.5 Medium: + dual attention in layers 0 and 1
  testdata/tiny-sd3-mmdit/sd3/        like SD 3 Medium: no QK-norm (2 layers)
  testdata/reference/sd3/mmdit.safetensors
  testdata/reference/README.md        (only the section between the mmdit markers)

Each model is built with `SD3Transformer2DModel(**config)`, every parameter redrawn from a
seeded normal (norm scales 1 +- 0.1, biases nonzero: a loader that drops one changes the
outputs), saved with `save_pretrained` in half precision (bf16, f16 for sd3/) to keep the files
small, and loaded back with `from_pretrained` as a user would, in f32, bf16 and f16.

Deterministic: seeded weights and inputs, one CPU thread, torch.use_deterministic_algorithms.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

import diffusers
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sd15 import save_tensors, seeded_randn, setup_determinism, write_readme_section  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "testdata" / "tiny-sd3-mmdit"
REF_DIR = REPO / "testdata" / "reference" / "sd3"
REF_README = REPO / "testdata" / "reference" / "README.md"
README_BEGIN = "<!-- mmdit begin -->"
README_END = "<!-- mmdit end -->"

BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=32,
    pooled_projection_dim=40,
    out_channels=16,
    pos_embed_max_size=12,
)
# name -> (config, seed of the weights, dtype stored)
MODELS = {
    "large": (dict(BASE, qk_norm="rms_norm"), 301, torch.bfloat16),
    "medium": (dict(BASE, qk_norm="rms_norm", dual_attention_layers=(0, 1)), 302, torch.bfloat16),
    "sd3": (dict(BASE, num_layers=2), 303, torch.float16),
}
BATCH, TOKENS, HEIGHT, WIDTH = 2, 7, 8, 12
TIMESTEPS = [1000.0, 500.0]


def reinit(model: torch.nn.Module, seed: int) -> None:
    """Every parameter from a seeded normal: 1-D `weight`s (RMS norms) 1 +- 0.1, matrices and
    convolutions N(0, 1/fan_in), biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                fan_in = p[0].numel()
                p.copy_(r / fan_in**0.5)


def build(name: str) -> Path:
    config, seed, dtype = MODELS[name]
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config)
    reinit(model, seed)
    folder = MODEL_DIR / name
    if folder.exists():
        shutil.rmtree(folder)
    # The large model in shards with an index, as the hub's SD 3.5 Large is stored.
    shard = "150KB" if name == "large" else "10GB"
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


def load(folder: Path, dtype: torch.dtype) -> SD3Transformer2DModel:
    model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    model.eval()
    return model


@torch.no_grad()
def run(model, inputs: dict[str, torch.Tensor], dtype: torch.dtype, skip_layers=None) -> torch.Tensor:
    out = model(
        hidden_states=inputs["latents"].to(dtype),
        encoder_hidden_states=inputs["context"].to(dtype),
        pooled_projections=inputs["pooled"].to(dtype),
        timestep=inputs["timesteps"],
        skip_layers=skip_layers,
    ).sample
    assert out.dtype == dtype
    out = out.float()
    assert torch.isfinite(out).all()
    return out


def f16_works() -> bool:
    try:
        a = torch.randn(4, 4).half()
        torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
        torch.nn.functional.layer_norm(a, (4,))
        return True
    except RuntimeError:
        return False


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    setup_determinism()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    REF_DIR.mkdir(parents=True, exist_ok=True)
    inputs = {
        "latents": seeded_randn((BATCH, 16, HEIGHT, WIDTH), 311),
        "timesteps": torch.tensor(TIMESTEPS, dtype=torch.float32),
        "context": seeded_randn((BATCH, TOKENS, 64), 312),
        "pooled": seeded_randn((BATCH, 40), 313),
    }
    refs = dict(inputs)
    # The position table as diffusers computes it (the checkpoints store it rounded to bf16/f16).
    refs["pos_embed_table"] = get_2d_sincos_pos_embed(
        32, BASE["pos_embed_max_size"], base_size=BASE["sample_size"] // BASE["patch_size"], output_type="pt"
    ).float()
    half = [torch.bfloat16] + ([torch.float16] if f16_works() else [])
    for name in MODELS:
        folder = build(name)
        m32 = load(folder, torch.float32)
        out = run(m32, inputs, torch.float32)
        refs[f"{name}_f32"] = out
        print(f"{name}: out std {out.std():.4f} max {out.abs().max():.4f}")
        if name == "large":
            skip = run(m32, inputs, torch.float32, skip_layers=[1])
            refs["large_skip1_f32"] = skip
            print(f"large skip [1]: differs from the full forward by {rel(skip, out):.3f} (rel max)")
            assert rel(skip, out) > 0.05
        if name in ("large", "medium"):
            for dt in half:
                key = f"{name}_{str(dt).removeprefix('torch.').replace('bfloat16', 'bf16').replace('float16', 'f16')}"
                h = run(load(folder, dt), inputs, dt)
                refs[key] = h
                print(f"{key}: rel max diff to f32 {rel(h, out):.4f}")
    # The half-precision models round their inputs: keep what they saw (exact in f32).
    save_tensors(REF_DIR / "mmdit.safetensors", refs)
    write_readme_section(begin=README_BEGIN, end=README_END, section=readme_section(half))
    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    total += (REF_DIR / "mmdit.safetensors").stat().st_size
    print(f"wrote {total / 1024:.0f} KiB")


def readme_section(half: list[torch.dtype]) -> str:
    has_f16 = torch.float16 in half
    f16_line = (
        "- `large_f16`, `medium_f16` [2,16,8,12]: the same, loaded with `torch_dtype=torch.float16` (f16 on the CPU)\n"
        if has_f16
        else "- (no f16 outputs: this torch's CPU kernels lack f16; compare f16 against `*_f32`)\n"
    )
    return f"""## sd3/mmdit.safetensors and ../tiny-sd3-mmdit/ (tools/reference/make_mmdit.py)

### ../tiny-sd3-mmdit/{{large,medium,sd3}}/
`SD3Transformer2DModel.save_pretrained` folders (`config.json` and
`diffusion_pytorch_model*.safetensors`): sample_size 8, patch 2, 16 channels in and out,
4 heads of 8 (inner 32), joint_attention_dim 64, caption_projection_dim 32,
pooled_projection_dim 40, pos_embed_max_size 12 (so latents up to 24x24; the stored
`pos_embed.pos_embed` [1,144,32] is diffusers' table).
- `large/`: 3 layers, qk_norm rms_norm (as SD 3.5 Large); weights bf16, in two shards with
  `diffusion_pytorch_model.safetensors.index.json` (as the hub stores big models).
- `medium/`: the same + dual_attention_layers (0, 1) (as SD 3.5 Medium: `attn2`, AdaLayerNormZeroX); bf16.
- `sd3/`: 2 layers, no qk_norm (as SD 3 Medium); weights f16.
Every parameter is a seeded normal (RMS-norm scales 1 +- 0.1, biases N(0, 0.01)), so a
dropped tensor changes the outputs.

### sd3/mmdit.safetensors
All f32. Inputs, shared by every model:
- `latents` [2,16,8,12] (non-square: 4x6 patches), `timesteps` [2] = [1000, 500],
  `context` [2,7,64] (encoder_hidden_states), `pooled` [2,40] (pooled_projections)
- `pos_embed_table` [144,32]: `get_2d_sincos_pos_embed(32, 12, base_size=4)` in f32, the table
  `PatchEmbed.__init__` computes (the model files store it rounded to their dtype)

Outputs of `model(latents, context, pooled, timesteps).sample` of the model loaded back with
`from_pretrained(folder, torch_dtype=...)`; for half precision the inputs are cast to that dtype
first and the output is stored upcast:
- `large_f32`, `medium_f32`, `sd3_f32` [2,16,8,12]: f32
- `large_skip1_f32` [2,16,8,12]: the large model in f32 with `skip_layers=[1]`
- `large_bf16`, `medium_bf16` [2,16,8,12]: loaded with `torch_dtype=torch.bfloat16` (bf16 on the CPU)
{f16_line}"""


if __name__ == "__main__":
    main()
