"""The tiny random-weight SD 1.5: its CLIP tokenizer files and its seeded models.

Used by make_sd15.py. The vocabulary is the real CLIP BPE (openai's bpe_simple_vocab_16e6.txt.gz)
cut to its first NUM_MERGES merges, built exactly as openai's SimpleTokenizer and transformers do;
`openai_encode` is openai's algorithm (without ftfy) to cross-check transformers' CLIPTokenizer.
Model channel sizes are far below the real model's but keep its structure (see UNET_CONFIG).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import regex
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
NUM_MERGES = 500

# SD 1.5's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5), verbatim. It predates
# `prediction_type` and `timestep_spacing`; diffusers marks such absent keys as "_use_default_values"
# and `OtherScheduler.from_config` then takes *that* class's defaults (Euler: timestep_spacing
# "linspace", not PNDM's "leading"). The folder keeps the hub's file so this behaves as for real.
SD15_SCHEDULER_FILE = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0"}
SD15_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# Channels are far below (32, 64, 64) to keep the whole folder under ~1.5 MB (that UNet alone is
# 8.7 MB); all three differ so every level change (and the up path's skip concatenations) is
# exercised. SD 1.5's structure is kept: 3 levels here, 2 layers per block, cross-attention.
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 24),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,  # SD 1.5's legacy name: this is the number of heads
    norm_num_groups=4,  # != 32, and group size 2..6 so the channel grouping matters
)

# 4 levels like the real VAE (so the scale factor is 8), channels below (16, 16, 32, 32) for size,
# with one channel change (8 -> 16) so the resnets' conv_shortcut is exercised.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
    scaling_factor=0.18215,
)


def find_bpe(explicit: str | None, workdir: Path) -> Path:
    """The openai BPE merges file: --bpe, an installed open_clip, or the open_clip_torch wheel."""
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is not None and spec.origin:
        cand = Path(spec.origin).parent / BPE_NAME
        if cand.exists():
            return cand
    print(f"downloading {OPEN_CLIP_WHEEL} (no deps) for {BPE_NAME}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", OPEN_CLIP_WHEEL, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/" + BPE_NAME))
        out = workdir / BPE_NAME
        out.write_bytes(zf.read(member))
    return out


def bytes_to_unicode() -> dict[int, str]:
    """openai/CLIP's byte -> printable character table (the order defines the first 256 ids)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """vocab and merges exactly as openai's SimpleTokenizer builds them, merges cut to NUM_MERGES."""
    digest = hashlib.sha256(bpe_path.read_bytes()).hexdigest()
    if digest != BPE_SHA256:
        raise SystemExit(f"{bpe_path}: sha256 {digest}, expected {BPE_SHA256}")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + NUM_MERGES]  # line 0 is the '"bpe_simple_vocab_16e6.txt#version: 0.2' header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token in the truncated vocabulary"
    return vocab, merges


def added_token(content: str, typed: bool) -> dict:
    tok = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **tok} if typed else tok


def write_tokenizer(dir_: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """The four files of runwayml/stable-diffusion-v1-5's tokenizer/ (openai/clip-vit-large-patch14)."""
    if dir_.exists():
        shutil.rmtree(dir_)
    dir_.mkdir(parents=True)
    (dir_ / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dir_ / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": added_token("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": added_token("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token("<|endoftext|>", True),
    }
    (dir_ / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {
        "bos_token": added_token("<|startoftext|>", False),
        "eos_token": added_token("<|endoftext|>", False),
        "pad_token": "<|endoftext|>",
        "unk_token": added_token("<|endoftext|>", False),
    }
    (dir_ / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


# openai/CLIP simple_tokenizer.py's pattern (compiled with IGNORECASE there, after lower-casing).
OPENAI_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def openai_encode(text: str, vocab: dict[str, int], merges: list[str], max_len: int = 77) -> list[int]:
    """openai's SimpleTokenizer.encode (ftfy.fix_text left out, as when ftfy is absent), then the
    pipeline's framing: <|startoftext|> ids <|endoftext|>, truncated to max_len, padded with eos."""
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    byte_enc = bytes_to_unicode()

    @functools.lru_cache(maxsize=None)
    def bpe(token: str) -> tuple[str, ...]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    text = html.unescape(html.unescape(text)).strip()
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = []
    for tok in regex.findall(OPENAI_PAT, text):
        tok = "".join(byte_enc[b] for b in tok.encode("utf-8"))
        ids.extend(vocab[t] for t in bpe(tok))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = [bos] + ids[: max_len - 2] + [eos]
    return ids + [eos] * (max_len - len(ids))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@torch.no_grad()
def reinit(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter from one seeded generator.

    The default init leaves norms at (1, 0) and gives near-grey images; here every tensor is
    non-trivial (a loader that drops a norm's affine or a bias is caught) and the output has
    real variation (pipeline images: std ~0.23, ~6% of values clamped). Conv/linear weights are
    N(0, 1 / fan_in), biases N(0, 0.05^2), norm scales 1 + N(0, 0.1^2), norm shifts N(0, 0.1^2),
    embeddings N(0, 0.5^2).
    """
    g = torch.Generator().manual_seed(seed)
    norm_params = set()
    for mname, m in model.named_modules():
        if isinstance(m, NORM_TYPES):
            for pname, _ in m.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}")
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name in norm_params:
            val = 1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise
        elif name.endswith("bias"):
            val = 0.05 * noise
        elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.Embedding):
            val = 0.5 * noise
        else:
            val = noise / float(np.sqrt(p[0].numel()))
        p.copy_(val)


def build_text_encoder(vocab: dict[str, int]) -> CLIPTextModel:
    # bos/eos/pad ids are the real SD 1.5 text_encoder/config.json values (0, 2, 1). eos_token_id == 2
    # selects transformers' legacy pooling rule: pooled = hidden[argmax(input_ids)], the first
    # occurrence of the largest id, which is <|endoftext|> (the last vocabulary entry) -- as in the
    # real model. make_sd15.make_clip checks that the "first eos id" rule gives the same result here.
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(1)
    model = CLIPTextModel(config)
    reinit(model, seed=101)
    return model.eval()


def build_unet() -> UNet2DConditionModel:
    torch.manual_seed(2)
    model = UNet2DConditionModel(**UNET_CONFIG)
    reinit(model, seed=102)
    return model.eval()


def build_vae() -> AutoencoderKL:
    torch.manual_seed(3)
    model = AutoencoderKL(**VAE_CONFIG)
    reinit(model, seed=103)
    return model.eval()


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
