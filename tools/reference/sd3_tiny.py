"""The tiny random-weight SD 3.5 Large- and Medium-style pipelines: configs and seeded models.

Used by make_sd3.py. The CLIP vocabulary, its tokenizer files and the reinit rule are
sd15_tiny's / sdxl_tiny's (real CLIP BPE cut to its first merges; every tensor drawn from a seeded
normal). tokenizer_3 is make_t5.py's real-format T5 tokenizer (a small sentencepiece Unigram model
saved by T5TokenizerFast). Widths are far below the real models' but keep their structure:

- two CLIP text encoders *both* with projections (SD 3's CLIP-L is a CLIPTextModelWithProjection,
  unlike SD 1.5's and SDXL's first encoder), their penultimate states side by side (24 + 32 = 56
  features) zero-padded to T5's width (64), their projected pooled outputs side by side (16 + 24);
- a T5 encoder (gated-GELU, relative position buckets) whose width is the MMDiT's
  joint_attention_dim;
- the MMDiT: patch 2, 16 latent channels, RMS QK-norm (3.5 Large and Medium), three joint blocks
  (the last context-pre-only); the Medium-style one has MMDiT-X dual attention in blocks 0 and 1;
- a 16-channel VAE without quant convolutions, with SD 3's scaling and shift factors.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd15_tiny import VAE_CONFIG, reinit

# stabilityai/stable-diffusion-3.5-large's scheduler/scheduler_config.json, verbatim (Medium's and
# Large Turbo's are the same).
SD35_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

TE1_HIDDEN, TE1_PROJECTION = 24, 16
TE2_HIDDEN, TE2_PROJECTION = 32, 24
T5_WIDTH = 64

TRANSFORMER_LARGE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=T5_WIDTH,
    caption_projection_dim=32,
    pooled_projection_dim=TE1_PROJECTION + TE2_PROJECTION,
    out_channels=16,
    pos_embed_max_size=12,
    qk_norm="rms_norm",
)
TRANSFORMER_MEDIUM = {**TRANSFORMER_LARGE, "dual_attention_layers": (0, 1)}

# tiny-sd15's VAE layout with SD 3's 16 latent channels, no quant convolutions and SD 3.5's factors.
SD3_VAE_CONFIG = {
    **VAE_CONFIG,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}

T5_CONFIG = dict(
    d_model=T5_WIDTH,
    d_kv=16,
    d_ff=96,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=True,
    layer_norm_epsilon=1e-6,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)

# Seeds for sd15_tiny.reinit, one per model (SDXL's use 401..405).
SEEDS = {"text_encoder": 501, "text_encoder_2": 502, "text_encoder_3": 503, "large": 504, "medium": 505,
         "vae": 506}


def _clip(vocab: dict[str, int], hidden: int, projection: int, act: str, seed: str) -> CLIPTextModelWithProjection:
    # bos/eos/pad ids as the real SD 3.5 text_encoder{,_2}/config.json (0, 2, 1): eos_token_id 2
    # selects transformers' legacy pooling (the first <|endoftext|>, the largest id).
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden + 13, projection_dim=projection,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
        hidden_act=act, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    torch.manual_seed(21)
    model = CLIPTextModelWithProjection(config)
    reinit(model, seed=SEEDS[seed])
    return model.eval()


def build_text_encoder(vocab: dict[str, int]) -> CLIPTextModelWithProjection:
    """CLIP ViT-L (quick_gelu) with its projection."""
    return _clip(vocab, TE1_HIDDEN, TE1_PROJECTION, "quick_gelu", "text_encoder")


def build_text_encoder_2(vocab: dict[str, int]) -> CLIPTextModelWithProjection:
    """OpenCLIP ViT-bigG (gelu) with its projection."""
    return _clip(vocab, TE2_HIDDEN, TE2_PROJECTION, "gelu", "text_encoder_2")


def build_text_encoder_3(vocab_size: int) -> T5EncoderModel:
    """T5-XXL's structure at width 64. Weights N(0, 1/fan_in) as reinit draws them, except the
    RMS norm scales (1 + N(0, 0.1²)) and the relative bias table and embeddings (N(0, 0.5²))."""
    torch.manual_seed(22)
    model = T5EncoderModel(T5Config(vocab_size=vocab_size, **T5_CONFIG))
    g = torch.Generator().manual_seed(SEEDS["text_encoder_3"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "relative_attention_bias" in name or name.endswith("shared.weight"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / float(p.shape[1] ** 0.5))
    return model.eval()


def build_transformer(config: dict, seed: str) -> SD3Transformer2DModel:
    torch.manual_seed(23)
    model = SD3Transformer2DModel(**config)
    with torch.no_grad():
        reinit(model, seed=SEEDS[seed])
    return model.eval()


def build_vae() -> AutoencoderKL:
    torch.manual_seed(24)
    model = AutoencoderKL(**SD3_VAE_CONFIG)
    with torch.no_grad():
        reinit(model, seed=SEEDS["vae"])
    return model.eval()
