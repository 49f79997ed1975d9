//! `transformer/config.json` of SD 3 / 3.5 (diffusers' `SD3Transformer2DModel`).

use candle_core::Result;
use serde::Deserialize;

fn sample_size() -> usize {
    128
}
fn patch_size() -> usize {
    2
}
fn sixteen() -> usize {
    16
}
fn num_layers() -> usize {
    18
}
fn attention_head_dim() -> usize {
    64
}
fn num_attention_heads() -> usize {
    18
}
fn joint_attention_dim() -> usize {
    4096
}
fn caption_projection_dim() -> usize {
    1152
}
fn pooled_projection_dim() -> usize {
    2048
}
fn pos_embed_max_size() -> usize {
    96
}

/// The fields of diffusers' `SD3Transformer2DModel` config, with diffusers' defaults for absent
/// keys (SD 3.5 Large's file has no `dual_attention_layers`); unknown keys are ignored.
/// [`MMDiTConfig::validate`] refuses what this implementation would compute wrongly.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MMDiTConfig {
    /// Latent side the model was trained at (128: 1024 pixels); it sets the position table's
    /// scale (`base_size = sample_size / patch_size`).
    #[serde(default = "sample_size")]
    pub sample_size: usize,
    /// Side of the square latent patches that become tokens.
    #[serde(default = "patch_size")]
    pub patch_size: usize,
    /// Latent channels in.
    #[serde(default = "sixteen")]
    pub in_channels: usize,
    /// Joint transformer blocks; the last one reads the context without updating it.
    #[serde(default = "num_layers")]
    pub num_layers: usize,
    /// Width of each attention head.
    #[serde(default = "attention_head_dim")]
    pub attention_head_dim: usize,
    /// Attention heads; `heads · head_dim` is the model width.
    #[serde(default = "num_attention_heads")]
    pub num_attention_heads: usize,
    /// Width of the text context in (CLIP-L ‖ CLIP-G zero-padded, then T5: 4096).
    #[serde(default = "joint_attention_dim")]
    pub joint_attention_dim: usize,
    /// Width of the context after `context_embedder` (must be the model width).
    #[serde(default = "caption_projection_dim")]
    pub caption_projection_dim: usize,
    /// Width of the pooled text embeddings (CLIP-L ‖ CLIP-G: 2048).
    #[serde(default = "pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    /// Latent channels out; `None` (a `null` in the file) means `in_channels`.
    #[serde(default = "default_out")]
    pub out_channels: Option<usize>,
    /// Side of the square position table, in patches: the largest latent is
    /// `pos_embed_max_size · patch_size` on each side.
    #[serde(default = "pos_embed_max_size")]
    pub pos_embed_max_size: usize,
    /// The blocks with a second, image-only attention (SD 3.5 Medium's MMDiT-X: 0..=12).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `"rms_norm"` for the RMS QK-norm of SD 3.5; `None` (SD 3) for none.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn default_out() -> Option<usize> {
    Some(16)
}

impl MMDiTConfig {
    /// `stabilityai/stable-diffusion-3.5-large` (and `-large-turbo`): 38 blocks of 38 heads × 64,
    /// RMS QK-norm, no dual attention.
    pub fn sd35_large() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 38,
            attention_head_dim: 64,
            num_attention_heads: 38,
            joint_attention_dim: 4096,
            caption_projection_dim: 2432,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: 192,
            dual_attention_layers: Vec::new(),
            qk_norm: Some("rms_norm".into()),
        }
    }

    /// `stabilityai/stable-diffusion-3.5-medium`: 24 blocks of 24 heads × 64, RMS QK-norm, dual
    /// attention in blocks 0–12, a 384-patch position table.
    pub fn sd35_medium() -> Self {
        Self {
            num_layers: 24,
            num_attention_heads: 24,
            caption_projection_dim: 1536,
            pos_embed_max_size: 384,
            dual_attention_layers: (0..13).collect(),
            ..Self::sd35_large()
        }
    }

    /// `stabilityai/stable-diffusion-3-medium-diffusers`: 24 blocks of 24 heads × 64, no QK-norm.
    pub fn sd3_medium() -> Self {
        Self {
            num_layers: 24,
            num_attention_heads: 24,
            caption_projection_dim: 1536,
            pos_embed_max_size: 192,
            qk_norm: None,
            ..Self::sd35_large()
        }
    }

    /// The model width, `num_attention_heads · attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Latent channels out.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Whether the attentions normalise queries and keys (RMS, per head).
    pub fn has_qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    /// The largest latent side the position table covers, in latent pixels.
    pub fn max_latent_side(&self) -> usize {
        self.pos_embed_max_size * self.patch_size
    }

    /// Refuses configurations this implementation would compute wrongly, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(candle_core::Error::Msg(format!("unsupported SD 3 transformer config: {what}")));
        for (name, value) in [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
            ("pos_embed_max_size", self.pos_embed_max_size),
            ("sample_size", self.sample_size),
        ] {
            if value == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        let inner = self.inner_dim();
        if self.caption_projection_dim != inner {
            // The joint attention projects the context with `add_q_proj(dim → inner)` of the
            // image stream's width: diffusers builds it with `added_kv_proj_dim=dim`.
            return bad(format!(
                "caption_projection_dim {} differs from num_attention_heads · attention_head_dim = {} · {} = {inner}",
                self.caption_projection_dim, self.num_attention_heads, self.attention_head_dim
            ));
        }
        if !inner.is_multiple_of(4) {
            // The 2-D sin-cos table gives each axis half the width, each half as sin and cos.
            return bad(format!("model width {inner} is not a multiple of 4 (the 2-D sin-cos position table)"));
        }
        if self.sample_size < self.patch_size {
            return bad(format!("sample_size {} is below patch_size {}", self.sample_size, self.patch_size));
        }
        if let Some(&i) = self.dual_attention_layers.iter().find(|&&i| i >= self.num_layers) {
            return bad(format!("dual_attention_layers names block {i} of {}", self.num_layers));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => Ok(()),
            Some(other) => bad(format!("qk_norm {other:?} (only \"rms_norm\" or none)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_match_the_hub_files_widths() {
        for (cfg, width, layers) in [
            (MMDiTConfig::sd35_large(), 2432, 38),
            (MMDiTConfig::sd35_medium(), 1536, 24),
            (MMDiTConfig::sd3_medium(), 1536, 24),
        ] {
            cfg.validate().unwrap();
            assert_eq!((cfg.inner_dim(), cfg.num_layers), (width, layers));
        }
        assert_eq!(MMDiTConfig::sd35_medium().max_latent_side(), 768);
    }

    #[test]
    fn reads_a_diffusers_file_with_defaults_and_unknown_keys() {
        // SD 3.5 Large's transformer/config.json: no dual_attention_layers key.
        let text = r#"{"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0.dev0",
            "attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16,
            "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
            "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128}"#;
        let cfg: MMDiTConfig = serde_json::from_str(text).unwrap();
        assert_eq!(cfg, MMDiTConfig::sd35_large());
        let null_out: MMDiTConfig = serde_json::from_str(r#"{"in_channels": 4, "out_channels": null}"#).unwrap();
        assert_eq!(null_out.out_channels(), 4);
    }

    #[test]
    fn inconsistent_configs_are_refused_by_name() {
        let cases: [(MMDiTConfig, &str); 4] = [
            (MMDiTConfig { caption_projection_dim: 1000, ..MMDiTConfig::sd3_medium() }, "caption_projection_dim 1000"),
            (MMDiTConfig { qk_norm: Some("l2".into()), ..MMDiTConfig::sd3_medium() }, "qk_norm \"l2\""),
            (MMDiTConfig { dual_attention_layers: vec![24], ..MMDiTConfig::sd3_medium() }, "block 24 of 24"),
            (MMDiTConfig { patch_size: 0, ..MMDiTConfig::sd3_medium() }, "patch_size is 0"),
        ];
        for (cfg, want) in cases {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
