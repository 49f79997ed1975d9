//! diffusers' `ResnetBlock2D` and the 2× down/up samplers, shared by the UNet and the VAE.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::conv::{conv1x1, conv3x3, Conv2d};
use crate::ops::linear::{linear, Linear};
use crate::ops::norm::GroupNorm;

/// `ResnetBlock2D`: GroupNorm → SiLU → conv → (+ time embedding) → GroupNorm → SiLU → conv, plus a
/// 1×1 shortcut when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// Loads a block; `temb_channels` is `None` in the VAE, which has no time embedding.
    pub fn new(
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let time_emb_proj = match temb_channels {
            Some(t) => Some(linear(t, cout, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let shortcut = if cin != cout { Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: GroupNorm::new(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: GroupNorm::new(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, vb.pp("conv2"))?,
            shortcut,
        })
    }

    /// The same block over channels-last activations `[b, h, w, c]`.
    pub fn into_channels_last(self) -> Result<Self> {
        Ok(Self {
            norm1: self.norm1.into_channels_last(),
            conv1: self.conv1.into_channels_last()?,
            time_emb_proj: self.time_emb_proj,
            norm2: self.norm2.into_channels_last(),
            conv2: self.conv2.into_channels_last()?,
            shortcut: self.shortcut.map(Conv2d::into_channels_last).transpose()?,
        })
    }

    /// Applies the block; `temb` is the (un-activated) time embedding `[b, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        // The projected time embedding `[b, cout]` is added to `h` per channel; `h` has no other
        // use, so the add is folded into the GroupNorm that reads it next.
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(proj.forward(&t.silu()?)?),
            _ => None,
        };
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        // `skip + conv2(…)`, the sum made as the convolution writes its output where it can.
        self.conv2.forward_add(&self.norm2.forward_with(&h, t.as_ref(), true)?, &skip)
    }
}

impl crate::stream::StreamBlock for ResnetBlock2D {}
impl crate::stream::StreamBlock for Downsample2D {}
impl crate::stream::StreamBlock for Upsample2D {}

/// `Downsample2D` with a convolution: stride 2, padding 1 in the UNet; padding 0 after an
/// asymmetric (right/bottom) zero pad in the VAE encoder.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    /// `padding` is diffusers' `downsample_padding` (1 in the UNet, 0 in the VAE).
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(channels, channels, 3, padding, 2, padding == 0, vb.pp("conv"))? })
    }

    /// Halves the spatial size (rounding up).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
}

/// `Upsample2D`: nearest-neighbour 2× (or to an explicit size) then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
    channels_last: bool,
}

impl Upsample2D {
    /// Loads `conv`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv3x3(channels, channels, vb.pp("conv"))?, channels_last: false })
    }

    /// The same over channels-last activations `[b, h, w, c]`.
    pub fn into_channels_last(self) -> Result<Self> {
        Ok(Self { conv: self.conv.into_channels_last()?, channels_last: true })
    }

    /// Upsamples to `size` (h, w) when given, else doubles. Nearest-neighbour with PyTorch's
    /// index rule `floor(dst · in / out)`, which candle's kernel uses too.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (h, w) = if self.channels_last { (x.dim(1)?, x.dim(2)?) } else { (x.dim(2)?, x.dim(3)?) };
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        if (th, tw) == (2 * h, 2 * w) {
            // The convolution reads the doubled input without it being copied where it can.
            return self.conv.forward_upsampled(x);
        }
        if self.channels_last {
            let up = x.permute((0, 3, 1, 2))?.upsample_nearest2d(th, tw)?.permute((0, 2, 3, 1))?.contiguous()?;
            return self.conv.forward(&up);
        }
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}
