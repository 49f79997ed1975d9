#!/usr/bin/env python3
"""Writes tiny GGUF files as city96's ComfyUI-GGUF tools make them, and reference dequantisation by
the `gguf` package (llama.cpp's own Python reader/writer), for crates/sdgen/tests/gguf.rs.

Writes (relative to the repository root), into testdata/gguf/:
  quants.gguf                 one [6, 512] tensor per type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
                              Q5_1 (values quantised by `gguf.quants.quantize`) and Q2_K, Q3_K, Q4_K,
                              Q5_K, Q6_K (random blocks with finite scales: the package cannot
                              quantise the K types, and random bit patterns test every field)
  quants-dequantised.safetensors
                              `gguf.quants.dequantize` of each, in f32, under the same names
  tiny-sd35-large-Q8_0.gguf   the MMDiT of testdata/tiny-sd35-single/tiny-sd35-large.safetensors
  tiny-sd35-medium-Q8_0.gguf  the MMDiT-X of tiny-sd35-medium.safetensors
  tiny-sd35-large-Q4_0.gguf   the Large MMDiT in Q4_0
  tiny-sdxl-Q8_0.gguf         the UNet of testdata/tiny-sdxl-single/tiny-sdxl-base.safetensors
  llm.gguf                    a two-tensor `llama` GGUF (an LLM's layout), for the refusal test
  README.md

The layout, as city96's tools/convert.py + his llama.cpp patch (lcpp_sd3.patch) write it:
  - the denoiser's tensors under the original checkpoint's names without `model.diffusion_model.`;
    `general.architecture` `sd3` / `sdxl`, `general.quantization_version` 2, `general.file_type`;
  - SD 1.x/SDXL (`shape_fix`): a tensor of > 1 dimension and >= 512 elements whose element count is
    a multiple of 256 but whose last dimension is not is stored as [n/256, 256], its real shape in
    `comfy.gguf.orig_shape.<name>`;
  - quantised: 2-D tensors whose name ends in `weight`, except the embeddings and the first and
    last layers (SD3: `final_layer.`, `t_embedder.`, `y_embedder.`, `context_embedder.`,
    `x_embedder.`, `pos_embed`; UNets: `time_embed.`, `label_emb.`, `input_blocks.0.0.weight`,
    `out.2.weight`, ...), whose rows are whole blocks; the rest keep their 16/32-bit values.
One deliberate difference: convert.py keeps tensors of <= 1024 elements in F32; the tiny models'
32x32 projections are that small while their fused q/k/v is not, so here every such weight is
quantised, which is the rule `--weights q8` applies to diffusers' names (it touches no real
model, whose smallest quantised weight has 1536x1536 elements). Dense tensors of these f32
checkpoints stay F32 (lossless); from a 16-bit checkpoint the published conversions hold the
one-dimensional ones in F32 and the rest in F16 (their base, `sd3.5_large-F16.gguf`), as
`sdgen-bench --export q8_0` writes them.
Quantised values come from the source values, as llama-quantize quantises the 16-bit base of a
16-bit checkpoint (whose values are the checkpoint's): so `--weights q8` on the safetensors gives
these bytes.

Checks (the script stops on failure): every file reads back with `gguf.GGUFReader`, each tensor's
dequantisation has the source's shape and, for Q8_0, is within half a quantisation step of the
source values (plus the f16 rounding of the scale: 127 × 2⁻¹¹ of a step).

Run `python tools/reference/make_gguf.py` after make_single_file_sd3.py and
make_single_file_sdxl.py. Deterministic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "testdata" / "gguf"

# What city96's llama.cpp patch keeps dense, by architecture (substring or exact name).
KEEP = {
    "sd3": (["final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.", "x_embedder."],
            ["proj_out.weight", "pos_embed"]),
    "sdxl": (["class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.", "conv_in.",
              "conv_out."], ["input_blocks.0.0.weight", "out.2.weight"]),
}


def block_elements(qtype: T) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def quantised_type(arch: str, name: str, data: np.ndarray, qtype: T) -> T | None:
    parts, exact = KEEP[arch]
    if data.ndim != 2 or not name.endswith("weight"):
        return None
    if any(p in name for p in parts) or name in exact:
        return None
    if data.shape[-1] % block_elements(qtype) != 0:
        return None
    return qtype


def dense_type(data: np.ndarray) -> T:
    return {np.dtype(np.float32): T.F32, np.dtype(np.float16): T.F16}[data.dtype]


def write_denoiser(src: Path, prefix: str, arch: str, qtype: T, out: Path) -> None:
    tensors = {k[len(prefix):]: v for k, v in load_file(str(src)).items() if k.startswith(prefix)}
    w = gguf.GGUFWriter(str(out), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type({T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    kinds: dict[str, int] = {}
    for name in sorted(tensors):
        data = tensors[name]
        n = data.size
        if arch != "sd3" and data.ndim > 1 and n >= 512 and n % 256 == 0 and data.shape[-1] % 256 != 0:
            w.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in data.shape])
            data = data.reshape(n // 256, 256)
        q = quantised_type(arch, name, data, qtype)
        ty = q if q is not None else dense_type(data)
        raw = gguf.quants.quantize(data.astype(np.float32), ty) if q is not None else data
        w.add_tensor(name, raw, raw_dtype=ty)
        kinds[ty.name] = kinds.get(ty.name, 0) + 1
        if q is not None:
            back = gguf.quants.dequantize(raw, ty).reshape(data.shape)
            step = np.abs(data).reshape(-1, block_elements(ty)).max(axis=1) / 127
            err = np.abs(back - data).reshape(-1, block_elements(ty)).max(axis=1)
            if ty == T.Q8_0 and not np.all(err <= step * 0.57 + 1e-7):
                sys.exit(f"{out.name}: {name} is not within half a Q8_0 step (+ the f16 rounding of its scale)")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{out.relative_to(ROOT)}: {kinds}")


def random_k_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks whose f16 scales are finite (d and dmin where the type has them)."""
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // elements, size), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    # Where the f16 scales sit in each block (ggml-common.h's block_qN_K).
    offset = {T.Q2_K: size - 4, T.Q3_K: size - 2, T.Q4_K: 0, T.Q5_K: 0, T.Q6_K: size - 2}[qtype]
    count = {T.Q2_K: 4, T.Q3_K: 2, T.Q4_K: 4, T.Q5_K: 4, T.Q6_K: 2}[qtype]
    blocks[:, offset:offset + count] = scales[:, :count]
    return blocks.reshape(rows, -1)


def write_quants() -> None:
    rng = np.random.default_rng(15)
    rows, cols = 6, 512
    w = gguf.GGUFWriter(str(OUT / "quants.gguf"), arch="sd3")
    reference = {}
    for ty in [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]:
        data = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = gguf.quants.quantize(data, ty)
        w.add_tensor(ty.name, raw, raw_dtype=ty)
        reference[ty.name] = gguf.quants.dequantize(raw, ty).reshape(rows, cols).astype(np.float32)
    for ty in [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
        raw = random_k_blocks(ty, rows, cols, rng)
        w.add_tensor(ty.name, raw, raw_dtype=ty)
        reference[ty.name] = gguf.quants.dequantize(raw, ty).reshape(rows, cols).astype(np.float32)
        if not np.all(np.isfinite(reference[ty.name])):
            sys.exit(f"{ty.name}: non-finite reference")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(reference, str(OUT / "quants-dequantised.safetensors"))
    print(f"quants.gguf: {sorted(reference)}")


def write_llm() -> None:
    w = gguf.GGUFWriter(str(OUT / "llm.gguf"), arch="llama")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_reads_back() -> None:
    for f in sorted(OUT.glob("*.gguf")):
        r = gguf.GGUFReader(str(f))
        for t in r.tensors:
            gguf.quants.dequantize(t.data, t.tensor_type)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_quants()
    sd35 = ROOT / "testdata" / "tiny-sd35-single"
    write_denoiser(sd35 / "tiny-sd35-large.safetensors", "model.diffusion_model.", "sd3", T.Q8_0,
                   OUT / "tiny-sd35-large-Q8_0.gguf")
    write_denoiser(sd35 / "tiny-sd35-medium.safetensors", "model.diffusion_model.", "sd3", T.Q8_0,
                   OUT / "tiny-sd35-medium-Q8_0.gguf")
    write_denoiser(sd35 / "tiny-sd35-large.safetensors", "model.diffusion_model.", "sd3", T.Q4_0,
                   OUT / "tiny-sd35-large-Q4_0.gguf")
    write_denoiser(ROOT / "testdata" / "tiny-sdxl-single" / "tiny-sdxl-base.safetensors", "model.diffusion_model.",
                   "sdxl", T.Q8_0, OUT / "tiny-sdxl-Q8_0.gguf")
    write_llm()
    check_reads_back()
    (OUT / "README.md").write_text(
        "Tiny GGUF files and reference dequantisation written by tools/reference/make_gguf.py (the `gguf`\n"
        "package, llama.cpp's Python writer, as city96's ComfyUI-GGUF tools lay them out); read its docstring\n"
        "for what each file is. Used by crates/sdgen/tests/gguf.rs.\n"
    )


if __name__ == "__main__":
    main()
