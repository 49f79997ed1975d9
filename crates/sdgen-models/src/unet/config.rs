//! `unet/config.json`.

use candle_core::Result;
use serde::Deserialize;

/// A config value that is one number for every block or one per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrList {
    /// The same value for every block.
    Int(usize),
    /// One value per down block.
    List(Vec<usize>),
}

impl IntOrList {
    /// One value per block for `n` blocks.
    pub fn expand(&self, n: usize) -> Vec<usize> {
        match self {
            IntOrList::Int(v) => vec![*v; n],
            IntOrList::List(v) => v.clone(),
        }
    }
}

fn one() -> IntOrList {
    IntOrList::Int(1)
}
fn two() -> IntOrList {
    IntOrList::Int(2)
}
fn eight() -> IntOrList {
    IntOrList::Int(8)
}
fn groups() -> usize {
    32
}
fn eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn padding() -> usize {
    1
}
fn four() -> usize {
    4
}

/// The fields of diffusers' `UNet2DConditionModel` config this implementation reads. Unknown
/// fields are ignored; options that change the architecture in ways not implemented are refused
/// by [`UNetConfig::validate`] rather than silently ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// Latent size the model was trained at (64 for SD 1.5: 512 pixels).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Channels per resolution level.
    pub block_out_channels: Vec<usize>,
    /// Down block kinds (`CrossAttnDownBlock2D` / `DownBlock2D`).
    pub down_block_types: Vec<String>,
    /// Up block kinds (`CrossAttnUpBlock2D` / `UpBlock2D`).
    pub up_block_types: Vec<String>,
    /// The mid block kind.
    #[serde(default)]
    pub mid_block_type: Option<String>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "two")]
    pub layers_per_block: IntOrList,
    /// Width of the text conditioning.
    pub cross_attention_dim: usize,
    /// Heads per block under diffusers' legacy naming (it is the head *count*).
    #[serde(default = "eight")]
    pub attention_head_dim: IntOrList,
    /// Heads per block when given explicitly.
    #[serde(default)]
    pub num_attention_heads: Option<IntOrList>,
    /// Transformer blocks per attention (SDXL: `[1, 2, 10]`).
    #[serde(default = "one")]
    pub transformer_layers_per_block: IntOrList,
    /// GroupNorm groups.
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of the resnets and the output norm.
    #[serde(default = "eps")]
    pub norm_eps: f64,
    /// Linear instead of 1×1-conv projections in the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Order of the sinusoidal time embedding.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the time embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Padding of the downsampling convolutions.
    #[serde(default = "padding")]
    pub downsample_padding: usize,
    /// SDXL's additional embedding: `"text_time"` (the pooled text embedding and the
    /// size/crop/aesthetic "micro-conditioning" numbers); no other kind is supported.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal embedding of each micro-conditioning number (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the additional embedding: the pooled text embedding plus every
    /// micro-conditioning number's embedding (SDXL base: 1280 + 6·256 = 2816; refiner: 1280 + 5·256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Class-conditioning (unused by the supported families).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// LCM's guidance embedding width (`time_embedding.cond_proj`'s input; LCM-distilled UNets
    /// such as LCM Dreamshaper v7: 256).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Time-embedding scale-shift mode of the resnets (only "default" is supported).
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// Whether to centre the input sample (unused by the supported families).
    #[serde(default)]
    pub center_input_sample: bool,
}

impl UNetConfig {
    /// How many micro-conditioning numbers (`time_ids`) the model takes per image, if it takes
    /// SDXL's additional embedding: 6 for the base (original size, crop, target size), 5 for the
    /// refiner (original size, crop, aesthetic score). `None` when the model has none, or when
    /// `text_embeds_dim` does not divide out.
    pub fn time_ids_len(&self, text_embeds_dim: usize) -> Option<usize> {
        let per = self.addition_time_embed_dim?;
        let total = self.projection_class_embeddings_input_dim?;
        let rest = total.checked_sub(text_embeds_dim)?;
        (per > 0 && rest % per == 0).then_some(rest / per)
    }

    /// Attention heads per block.
    pub fn heads_per_block(&self) -> Vec<usize> {
        let n = self.block_out_channels.len();
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).expand(n)
    }

    /// Refuses configurations this implementation would compute wrongly.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let unsupported = |what: String| Err(candle_core::Error::Msg(format!("unsupported UNet config: {what}")));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return unsupported(format!(
                "{} block_out_channels, {} down blocks, {} up blocks",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for (name, list) in [
            ("layers_per_block", &self.layers_per_block),
            ("attention_head_dim", &self.attention_head_dim),
            ("transformer_layers_per_block", &self.transformer_layers_per_block),
        ] {
            if list.expand(n).len() != n {
                return unsupported(format!("{name} has not one value per block"));
            }
        }
        let known = ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"];
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !known.contains(&t.as_str()) {
                return unsupported(format!("block type {t}"));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return unsupported(format!("mid_block_type {m}"));
            }
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none() =>
            {
                return unsupported(
                    "addition_embed_type text_time without addition_time_embed_dim and \
                     projection_class_embeddings_input_dim"
                        .into(),
                );
            }
            Some("text_time") => {}
            Some(a) => return unsupported(format!("addition_embed_type {a}")),
        }
        if let Some(c) = &self.class_embed_type {
            return unsupported(format!("class_embed_type {c}"));
        }
        if let Some(m) = &self.resnet_time_scale_shift {
            if m != "default" {
                return unsupported(format!("resnet_time_scale_shift {m}"));
            }
        }
        if self.center_input_sample {
            return unsupported("center_input_sample".into());
        }
        Ok(())
    }
}
