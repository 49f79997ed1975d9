"""The tiny random-weight SDXL base and refiner: configs, tokenizer_2 files and seeded models.

Used by make_sdxl.py. The vocabulary and the reinit rule are sd15_tiny's (real CLIP BPE cut to its
first NUM_MERGES merges; every tensor drawn from a seeded normal). Channel sizes are far below
the real models' but keep their structure: SDXL base (stabilityai/stable-diffusion-xl-base-1.0)
and refiner (stabilityai/stable-diffusion-xl-refiner-1.0) block layouts, text_time added
conditioning, two CLIP text encoders (the second with a projection), per-block transformer depths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd15_tiny import VAE_CONFIG, added_token, reinit, write_tokenizer

# SDXL base's (and refiner's) scheduler/scheduler_config.json, verbatim (diffusers 0.19.0.dev0).
# Unlike SD 1.5's it spells out timestep_spacing "leading" and prediction_type, so Euler does not
# fall back to its own "linspace" default; keys added to Euler since (final_sigmas_type,
# rescale_betas_zero_snr, sigma_min/max, timestep_type, use_*_sigmas) take the class defaults.
SDXL_SCHEDULER_FILE = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0"}
SDXL_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TE1_HIDDEN = 32
TE2_HIDDEN = 48
TE2_PROJECTION = 40
ADD_TIME_DIM = 8

# SDXL base: 3 levels, attention only on the lower two, per-level transformer depth (the real
# (1, 2, 10); here (1, 2, 3) so a loader that assumes one depth for all levels is caught; the mid
# block uses the last). attention_head_dim is the legacy name for the *head count* (SDXL: 5, 10,
# 20), giving head sizes 8, 8, 6. Cross-attention width = te1 hidden + te2 hidden (the two
# penultimate states concatenated); the add embedding sees te2's projected pooled output (40) +
# 6 time ids x 8 sinusoidal features.
BASE_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 24),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2, 4),
    transformer_layers_per_block=(1, 2, 3),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=ADD_TIME_DIM,
    cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
    projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * ADD_TIME_DIM,
    norm_num_groups=4,
)

# SDXL refiner: 4 levels, attention on the middle two, one transformer depth (the real 4; here 2),
# heads (6, 12, 24, 24) -> (2, 2, 4, 4). It is conditioned on te2 alone and 5 time ids (original
# size, crop top-left, aesthetic score).
REFINER_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 24, 24),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 4, 4),
    transformer_layers_per_block=2,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=ADD_TIME_DIM,
    cross_attention_dim=TE2_HIDDEN,
    projection_class_embeddings_input_dim=TE2_PROJECTION + 5 * ADD_TIME_DIM,
    norm_num_groups=4,
)

# tiny-sd15's VAE with SDXL's scaling factor and force_upcast (the real SDXL VAE overflows in fp16).
SDXL_VAE_CONFIG = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}

# Seeds for sd15_tiny.reinit, one per model (SD 1.5's use 101..103).
SEEDS = {"text_encoder": 401, "text_encoder_2": 402, "unet": 403, "refiner_unet": 404, "vae": 405}


def write_tokenizer_2(dir_: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """tokenizer_2/ of stabilityai/stable-diffusion-xl-base-1.0 (and -refiner-1.0): the same
    vocab.json / merges.txt as tokenizer/, but its two config files pad with "!" (open_clip's
    zero padding: "!" is id 0), which transformers then treats as an added (special) token."""
    write_tokenizer(dir_, vocab, merges)
    config = {
        "add_prefix_space": False,
        "bos_token": added_token("<|startoftext|>", True),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": added_token("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token("<|endoftext|>", True),
    }
    (dir_ / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {
        "bos_token": added_token("<|startoftext|>", False),
        "eos_token": added_token("<|endoftext|>", False),
        "pad_token": "!",
        "unk_token": added_token("<|endoftext|>", False),
    }
    (dir_ / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _clip_config(vocab: dict[str, int], **kw) -> CLIPTextConfig:
    # bos/eos/pad ids are the real SDXL text_encoder{,_2}/config.json values (0, 2, 1): eos_token_id
    # == 2 selects transformers' legacy pooling, hidden[argmax(input_ids)] = the first
    # <|endoftext|> (the largest id), also for tokenizer_2's "!" padding (id 0).
    return CLIPTextConfig(
        vocab_size=len(vocab),
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **kw,
    )


def build_text_encoder(vocab: dict[str, int]) -> CLIPTextModel:
    """SDXL's text_encoder (CLIP ViT-L, quick_gelu); only its penultimate hidden state is used."""
    config = _clip_config(vocab, hidden_size=TE1_HIDDEN, intermediate_size=37, projection_dim=TE1_HIDDEN,
                          hidden_act="quick_gelu")
    torch.manual_seed(11)
    model = CLIPTextModel(config)
    reinit(model, seed=SEEDS["text_encoder"])
    return model.eval()


def build_text_encoder_2(vocab: dict[str, int]) -> CLIPTextModelWithProjection:
    """SDXL's text_encoder_2 (OpenCLIP ViT-bigG, gelu, with text_projection, no bias)."""
    config = _clip_config(vocab, hidden_size=TE2_HIDDEN, intermediate_size=53, projection_dim=TE2_PROJECTION,
                          hidden_act="gelu")
    torch.manual_seed(12)
    model = CLIPTextModelWithProjection(config)
    reinit(model, seed=SEEDS["text_encoder_2"])
    return model.eval()


def build_unet(config: dict, seed_name: str) -> UNet2DConditionModel:
    torch.manual_seed(13)
    model = UNet2DConditionModel(**config)
    reinit(model, seed=SEEDS[seed_name])
    return model.eval()


def build_vae() -> AutoencoderKL:
    torch.manual_seed(14)
    model = AutoencoderKL(**SDXL_VAE_CONFIG)
    reinit(model, seed=SEEDS["vae"])
    return model.eval()
