#!/usr/bin/env python3
"""Builds small random LoRAs for the tiny SD 1.5 and SDXL and diffusers' images with them fused.

Writes (relative to the repository root):
  testdata/lora/{sd15,sdxl}_{peft,kohya}.safetensors   the LoRAs (a few KB each)
  testdata/reference/lora/lora.json                     the cases (prompt, seeds, steps, LoRAs, scales)
  testdata/reference/lora/png/<case>_<i>.png            the images as 8-bit PNGs
  testdata/reference/lora/lora.safetensors              per case: `<case>` the images [n,h,w,3]
                                                        (output_type="np") and `<case>/<component>/<name>`
                                                        every weight the LoRAs changed, as fused

Two key formats, for the UNet and every text encoder of each family:
- diffusers / PEFT: the keys the pipeline's `save_lora_weights` writes for peft adapters (rank 4,
  lora_alpha 4, so no alpha is stored): `unet.<module>.lora_A.weight` / `lora_B.weight`,
  `text_encoder.<module>…`, `text_encoder_2.<module>…`, written directly (transformers 5.25's
  `add_adapter` wants a peft newer than PyPI has).
- kohya / A1111, named as kohya-ss/sd-scripts' `networks/lora.py` names its modules
  (`LoRANetwork.create_modules`: `lora_name = prefix + "." + name + "." + child_name` with the dots
  made underscores; prefixes `lora_unet`, `lora_te` (SD 1.x) or `lora_te1`/`lora_te2` (SDXL)),
  `<lora_name>.lora_down.weight`, `.lora_up.weight` and `.alpha` (a scalar, here ≠ rank so the
  alpha/rank factor is exercised). SD 1.x's UNet names are diffusers' module paths (sd-scripts
  trains it on `library/original_unet.py`, which keeps them); SDXL's are the SGM UNet's
  (`library/sdxl_original_unet.py`: `input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
  `input_blocks.1.0.in_layers.2` for a resnet's conv1). Conv LoRAs (LoCon, sd-scripts'
  `conv_dim`): 3x3 resnet convs with a 3x3 `lora_down` and a 1x1 `lora_up`; SD 1.x's 1x1
  `proj_in`/`proj_out` convs with 1x1 ones.

Every LoRA tensor is seeded randn times a small factor, so the deltas change the images visibly
but the images stay in range. diffusers loads each file with `load_lora_weights(file,
adapter_name=…)`, `set_adapters(names, weights)` and `fuse_lora(lora_scale=…)`, then
`unload_lora_weights()` (which keeps the fused weights) and runs as make_sd15.py / make_sdxl.py
do: CPU, f32, one thread, deterministic algorithms, `generator=[Generator("cpu").manual_seed(s)]`,
`output_type="np"`, the folders' own schedulers (SD 1.5: PNDM; SDXL: Euler).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
LORA_DIR = REPO / "testdata" / "lora"
REF_DIR = REPO / "testdata" / "reference" / "lora"
RANK = 4
KOHYA_ALPHA = 2.0
PROMPT = "a lighthouse at dusk"

# Modules a LoRA adapts, as diffusers names them (suffixes of module paths).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# Resnet convs a kohya LoCon adapts too.
UNET_CONV_TARGETS = ["conv1", "conv2"]


def setup_determinism() -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()


def encoder_names(pipe) -> list[str]:
    return ["text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_2") else [])


def gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def targets(model: torch.nn.Module, suffixes: list[str], kinds=(torch.nn.Linear, torch.nn.Conv2d)) -> list[str]:
    """Module paths ending in one of `suffixes` (as whole dotted parts), in model order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, kinds) and any(name == s or name.endswith("." + s) for s in suffixes):
            out.append(name)
    return out


# --- diffusers / PEFT -----------------------------------------------------------------------


def make_peft(pipe, path: Path, seed: int) -> None:
    """The keys `save_lora_weights` writes for peft adapters (`<component>.<module>.lora_A.weight`
    [r, in(, k, k)] and `lora_B.weight` [out, r(, 1, 1)]), written directly: transformers 5.25's
    `add_adapter` wants a peft newer than PyPI has."""
    tensors = lora_tensors(pipe.unet, "unet.", UNET_TARGETS, seed, ".lora_A.weight", ".lora_B.weight")
    for i, e in enumerate(encoder_names(pipe)):
        tensors.update(lora_tensors(getattr(pipe, e), e + "." + text_model_level(pipe, e), TE_TARGETS, seed + 1 + i, ".lora_A.weight",
                                    ".lora_B.weight"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


# --- kohya / A1111 --------------------------------------------------------------------------


def sgm_unet_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet module path as SGM / sd-scripts' SDXL UNet names it (the inverse of
    diffusers' `_maybe_map_sgm_blocks_to_diffusers`; the project's `rules.rs` LDM_UNET rows)."""
    per = layers_per_block + 1
    p = name.split(".")
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3"}
    if p[0] == "down_blocks":
        b, kind, l, rest = int(p[1]), p[2], int(p[3]), p[4:]
        head = f"input_blocks.{1 + b * per + l}." + ("0" if kind == "resnets" else "1")
    elif p[0] == "up_blocks":
        b, kind, l, rest = int(p[1]), p[2], int(p[3]), p[4:]
        head = f"output_blocks.{b * per + l}." + ("0" if kind == "resnets" else "1")
    elif p[0] == "mid_block":
        kind, l, rest = p[1], int(p[2]), p[3:]
        head = "middle_block." + (str(2 * l) if kind == "resnets" else "1")
    else:
        raise ValueError(name)
    tail = ".".join(rest)
    if kind == "resnets":
        tail = resnet[tail]
    return f"{head}.{tail}"


def lora_tensors(model: torch.nn.Module, prefix: str, suffixes: list[str], seed: int, down_key: str, up_key: str,
                 rename=lambda n: n, conv_suffixes: list[str] = (), alpha=None, dots=".") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    names = targets(model, suffixes) + targets(model, list(conv_suffixes), kinds=(torch.nn.Conv2d,))
    for name in names:
        m = model.get_submodule(name)
        key = prefix + rename(name).replace(".", dots)
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size
            down = torch.randn((RANK, m.in_channels, *k), generator=g) * 0.06
            up = torch.randn((m.out_channels, RANK, 1, 1), generator=g) * 0.06
        else:
            down = torch.randn((RANK, m.in_features), generator=g) * 0.06
            up = torch.randn((m.out_features, RANK), generator=g) * 0.06
        out[key + down_key] = down
        out[key + up_key] = up
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def make_kohya(pipe, path: Path, seed: int) -> None:
    sdxl = hasattr(pipe, "text_encoder_2")
    lpb = pipe.unet.config.layers_per_block
    rename = (lambda n: sgm_unet_name(n, lpb)) if sdxl else (lambda n: n)
    kw = dict(down_key=".lora_down.weight", up_key=".lora_up.weight", alpha=KOHYA_ALPHA, dots="_")
    tensors = lora_tensors(pipe.unet, "lora_unet_", UNET_TARGETS, seed, rename=rename,
                           conv_suffixes=UNET_CONV_TARGETS, **kw)
    prefixes = ["lora_te1_", "lora_te2_"] if sdxl else ["lora_te_"]
    for i, (e, prefix) in enumerate(zip(encoder_names(pipe), prefixes)):
        level = text_model_level(pipe, e).replace(".", "_")
        tensors.update(lora_tensors(getattr(pipe, e), prefix + level, TE_TARGETS, seed + 1 + i, **kw))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"ss_network_module": "networks.lora"})


# --- references -----------------------------------------------------------------------------

FAMILIES = {
    "sd15": dict(cls=StableDiffusionPipeline, folder="tiny-sd15", steps=10, guidance=7.5),
    "sdxl": dict(cls=StableDiffusionXLPipeline, folder="tiny-sdxl", steps=8, guidance=5.0),
}

# The fused weights kept as references (all would be 6 MB): the mid block (its attention and
# resnets), a transformer block and a resnet of each side, the first text-encoder layer.
KEEP = [".mid_block.", ".down_blocks.1.attentions.0.transformer_blocks.0.", ".down_blocks.1.resnets.0.",
        ".up_blocks.1.attentions.1.proj_", ".up_blocks.1.resnets.2.", ".layers.0."]

CASES = [
    dict(name="sd15_peft", family="sd15", loras=[("sd15_peft", 0.8)], seeds=[42]),
    dict(name="sd15_kohya", family="sd15", loras=[("sd15_kohya", 0.8)], seeds=[42]),
    dict(name="sd15_both", family="sd15", loras=[("sd15_peft", 0.8), ("sd15_kohya", 0.5)], seeds=[7]),
    dict(name="sdxl_peft", family="sdxl", loras=[("sdxl_peft", 0.8)], seeds=[42]),
    dict(name="sdxl_kohya", family="sdxl", loras=[("sdxl_kohya", 0.8)], seeds=[42]),
]


def load_pipe(family: str):
    f = FAMILIES[family]
    kw = {"add_watermarker": False} if family == "sdxl" else {}
    pipe = f["cls"].from_pretrained(REPO / "testdata" / f["folder"], dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(pipe) -> dict[str, torch.nn.Module]:
    names = ["unet", "text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_2") else [])
    return {n: getattr(pipe, n) for n in names}


def text_model_level(pipe, encoder: str) -> str:
    """`text_model.` where transformers 5's module paths of `encoder` lack that level (its
    `CLIPTextModel`; `CLIPTextModelWithProjection` keeps it): the files name every text-encoder
    module as transformers 4 did, as the LoRAs in the wild do."""
    return "" if hasattr(getattr(pipe, encoder), "text_model") else "text_model."


def as_transformers5(pipe, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA with its text-encoder module paths as transformers 5 names them. The files name
    them as LoRAs in the wild do (`text_encoder.text_model.encoder.…`, `lora_te_text_model_encoder_…`,
    transformers 4's `CLIPTextModel.text_model`); transformers 5's `CLIPTextModel` has no
    `text_model` level and diffusers 0.42 does not strip it (it fails in `get_peft_kwargs`), so the
    same tensors are handed to it without that part of the name (see `text_model_level`)."""
    level = {e: text_model_level(pipe, e) for e in encoder_names(pipe)}
    kohya = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
    out = {}
    for k, v in tensors.items():
        for e, lv in level.items():
            if lv:
                k = k.replace(f"{e}.{lv}", f"{e}.", 1)
                for p in kohya[e]:
                    if k.startswith(p + "text_model_"):
                        k = p + k[len(p + "text_model_"):]
        out[k] = v
    return out


@torch.no_grad()
def run_case(case) -> tuple[dict[str, torch.Tensor], dict]:
    f = FAMILIES[case["family"]]
    pipe = load_pipe(case["family"])
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in components(pipe).items()}
    names = []
    for file, _ in case["loras"]:
        pipe.load_lora_weights(as_transformers5(pipe, load_file(str(LORA_DIR / f"{file}.safetensors"))), adapter_name=file)
        names.append(file)
    pipe.set_adapters(names, adapter_weights=[s for _, s in case["loras"]])
    pipe.fuse_lora(lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()
    out = {}
    for c, m in components(pipe).items():
        changed = 0
        for k, v in m.state_dict().items():
            assert k in before[c], f"{case['name']}: {c} has a new tensor {k} after unload"
            if not torch.equal(v, before[c][k]):
                changed += 1
                if any(part in f".{k}" for part in KEEP):
                    out[f"{case['name']}/{c}/{k}"] = v.clone()
        assert changed > 0, f"{case['name']}: the LoRA changed nothing in {c}"
    n = len(case["seeds"])
    images = pipe(prompt=[PROMPT] * n, num_inference_steps=f["steps"], guidance_scale=f["guidance"], width=64,
                  height=64, generator=gens(case["seeds"]), output_type="np").images
    out[case["name"]] = torch.from_numpy(images).float()
    # As make_sdxl.py's numpy_to_png (diffusers' numpy_to_pil), for the CLI tests.
    (REF_DIR / "png").mkdir(exist_ok=True)
    for i, im in enumerate((images * 255).round().astype("uint8")):
        Image.fromarray(im).save(REF_DIR / "png" / f"{case['name']}_{i}.png")
    meta = dict(case, prompt=PROMPT, steps=f["steps"], guidance=f["guidance"], width=64, height=64,
                loras=[dict(file=f"lora/{file}.safetensors", scale=s) for file, s in case["loras"]])
    return out, meta


def main() -> None:
    setup_determinism()
    LORA_DIR.mkdir(parents=True, exist_ok=True)
    REF_DIR.mkdir(parents=True, exist_ok=True)
    for family, seed in [("sd15", 100), ("sdxl", 200)]:
        pipe = load_pipe(family)
        make_peft(pipe, LORA_DIR / f"{family}_peft.safetensors", seed)
        make_kohya(pipe, LORA_DIR / f"{family}_kohya.safetensors", seed + 50)
    tensors, cases = {}, []
    for case in CASES:
        t, meta = run_case(case)
        tensors.update(t)
        cases.append(meta)
        print(case["name"], f"{sum(1 for k in t if k.count('/') == 2)} fused tensors kept")
    # The same pipelines without LoRAs differ from these images (else the LoRAs prove nothing).
    for family in FAMILIES:
        f = FAMILIES[family]
        plain = load_pipe(family)(prompt=[PROMPT], num_inference_steps=f["steps"], guidance_scale=f["guidance"],
                                  width=64, height=64, generator=gens([42]), output_type="np").images
        diff = (torch.from_numpy(plain).float() - tensors[f"{family}_peft"]).abs().max().item()
        print(f"{family}: the PEFT LoRA moves the image by up to {diff * 255:.1f}/255")
        assert diff > 10 / 255
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(REF_DIR / "lora.safetensors"))
    (REF_DIR / "lora.safetensors").chmod(0o644)
    (REF_DIR / "lora.json").write_text(json.dumps(cases, indent=1) + "\n")
    for p in sorted(LORA_DIR.iterdir()):
        keys = list(load_file(str(p)))
        print(f"{p.name}: {p.stat().st_size} bytes, {len(keys)} tensors, e.g. {keys[0]}")


if __name__ == "__main__":
    main()
