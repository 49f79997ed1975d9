//! Activation estimates: per stage, a small formula with named coefficients, fitted to
//! measurements ([`super::fit_coefficients`]).
//!
//! ```text
//! bytes = fixed_bytes                                           (buffers, workspaces)
//!       + bytes_per_output_pixel · images · width · height      (the decoded images, kept whole)
//!       + max( bytes_per_pixel              · items · pixels,   (convolutions, norms, MLPs)
//!              bytes_per_pixel_at_attention · items · pixels
//!                + bytes_per_score          · slices · tokens²) (during the largest attention)
//! ```
//!
//! Two moments compete for the peak: the widest feature maps (the VAE decoder's full-resolution
//! group norms) and the largest attention (its score matrices beside the few feature maps live
//! then). Which one wins depends on the size and the batch — the UNet's attention wins unsliced,
//! its feature maps when the attention is sliced — so the formula takes their maximum rather
//! than their sum, which would over-count by the smaller. The engine never materialises more
//! than [`ENGINE_MAX_SCORE_ELEMENTS`] scores at once, so the score term is bounded by it.
//!
//! `items` is how many inputs one forward takes at once (images × 2 for a guided denoiser, 1
//! with VAE slicing), `pixels` the image pixels one item covers (the tile's with VAE tiling),
//! `tokens = pixels / pixels_per_token + extra_tokens` at the model's largest attention, and
//! `slices = items · heads`, or the slice size with attention slicing (how many score matrices
//! are materialised at once). The coefficients differ by kernel family (the CPU's tiled
//! convolutions vs the GPU's full im2col) and by precision, hence a [`CoefficientTable`].

use serde::{Deserialize, Serialize};

use super::manifest::Precision;

/// How many items a stage processes at once, given the images of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchRule {
    /// One prompt at a time (text encoders: the negative and positive prompts are encoded
    /// separately, whatever the batch).
    OnePrompt,
    /// The images of the batch, doubled with classifier-free guidance (a denoiser).
    GuidedImages,
    /// The images of the batch (a VAE), or one with VAE slicing.
    Images,
}

/// The most attention score elements the engine materialises in one call on the CPU: past this
/// it scores the query rows in chunks whatever the plan says
/// (`sdgen_models::ops::attention::MAX_SCORE_ELEMENTS`). Estimates never count more.
pub const ENGINE_MAX_SCORE_ELEMENTS: f64 = crate::limits::MAX_SCORE_ELEMENTS_CPU as f64;

/// The same on a GPU (`sdgen_models::ops::attention::MAX_SCORE_ELEMENTS_CUDA`: smaller, since large
/// transient buffers fragment the CUDA memory pool).
pub const ENGINE_MAX_SCORE_ELEMENTS_GPU: f64 = crate::limits::MAX_SCORE_ELEMENTS_GPU as f64;

/// The largest attention of a stage, the one whose score matrices dominate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AttentionShape {
    /// Heads.
    pub heads: usize,
    /// Image pixels per token at that attention (64 for SD 1.5's UNet at full latent size:
    /// 8×8 pixels per latent cell; 64 for its VAE's single-head mid attention too).
    pub pixels_per_token: usize,
    /// Tokens that do not scale with the image (SD 3's joint attention over the text).
    pub extra_tokens: usize,
}

/// How many coefficients a formula has.
pub(crate) const TERMS: usize = 6;

/// The most elements of a convolution column buffer the engine builds in one call on the CPU
/// (`sdgen_models::ops::conv::MAX_CONV_COLUMN_ELEMENTS`): past it the batch's images are convolved
/// one at a time, and an image too large alone in bands of rows.
pub const ENGINE_MAX_CONV_COLUMN_ELEMENTS: f64 = crate::limits::MAX_CONV_COLUMN_ELEMENTS_CPU as f64;

/// The same on a GPU (`sdgen_models::ops::conv::MAX_CONV_COLUMN_ELEMENTS_CUDA`).
pub const ENGINE_MAX_CONV_COLUMN_ELEMENTS_GPU: f64 = crate::limits::MAX_CONV_COLUMN_ELEMENTS_GPU as f64;

/// The coefficients of one formula (see the module docs). Bytes, as `f64` for fitting.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Coefficients {
    /// Bytes per item-pixel at the feature-map peak.
    pub bytes_per_pixel: f64,
    /// Bytes per item-pixel of the feature maps live during the largest attention.
    #[serde(default)]
    pub bytes_per_pixel_at_attention: f64,
    /// Bytes per attention score element materialised at once.
    pub bytes_per_score: f64,
    /// Bytes per pixel of every output image (held whole even when decoded in tiles).
    pub bytes_per_output_pixel: f64,
    /// Bytes that do not scale.
    pub fixed_bytes: f64,
    /// Bytes per element of the largest convolution column (im2col) buffer of one call
    /// ([`ActivationModel::conv_column_elements_per_pixel`]): the element size, fitted.
    #[serde(default)]
    pub bytes_per_column_element: f64,
}

impl Coefficients {
    /// Estimated bytes for these features.
    pub fn apply(&self, f: &Features) -> f64 {
        let maps = self.bytes_per_pixel * f.pixel;
        let attention = self.bytes_per_pixel_at_attention * f.pixel + self.bytes_per_score * f.score;
        self.fixed_bytes
            + self.bytes_per_output_pixel * f.output_pixel
            + maps.max(attention)
            + self.bytes_per_column_element * f.column
    }

    /// Whether the attention moment is the peak for these features.
    pub fn attention_dominates(&self, f: &Features) -> bool {
        self.bytes_per_pixel_at_attention * f.pixel + self.bytes_per_score * f.score > self.bytes_per_pixel * f.pixel
    }

    /// Every coefficient multiplied by `factor`.
    pub fn scaled(&self, factor: f64) -> Self {
        Self::from_array(self.to_array().map(|c| c * factor))
    }

    pub(crate) fn to_array(self) -> [f64; TERMS] {
        [
            self.bytes_per_pixel,
            self.bytes_per_pixel_at_attention,
            self.bytes_per_score,
            self.bytes_per_output_pixel,
            self.fixed_bytes,
            self.bytes_per_column_element,
        ]
    }

    pub(crate) fn from_array(a: [f64; TERMS]) -> Self {
        Self {
            bytes_per_pixel: a[0],
            bytes_per_pixel_at_attention: a[1],
            bytes_per_score: a[2],
            bytes_per_output_pixel: a[3],
            fixed_bytes: a[4],
            bytes_per_column_element: a[5],
        }
    }
}

/// Which kernels run a stage: they differ in their temporary buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelFamily {
    /// The CPU: tiled im2col convolutions, per-thread packing buffers.
    Cpu,
    /// A GPU: full im2col convolutions (candle's CUDA and Metal paths), library workspaces.
    Gpu,
}

impl KernelFamily {
    /// The most attention score elements the engine materialises in one call on these kernels.
    pub fn max_score_elements(self) -> u64 {
        match self {
            KernelFamily::Cpu => ENGINE_MAX_SCORE_ELEMENTS as u64,
            KernelFamily::Gpu => ENGINE_MAX_SCORE_ELEMENTS_GPU as u64,
        }
    }

    /// The most convolution column elements the engine builds in one call on these kernels.
    pub fn max_column_elements(self) -> u64 {
        match self {
            KernelFamily::Cpu => ENGINE_MAX_CONV_COLUMN_ELEMENTS as u64,
            KernelFamily::Gpu => ENGINE_MAX_CONV_COLUMN_ELEMENTS_GPU as u64,
        }
    }
}

/// One formula's coefficients per kernel family and precision class.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CoefficientTable {
    /// CPU, f32.
    pub cpu_f32: Coefficients,
    /// CPU, f16/bf16.
    pub cpu_half: Coefficients,
    /// GPU, f32.
    pub gpu_f32: Coefficients,
    /// GPU, f16/bf16.
    pub gpu_half: Coefficients,
}

impl CoefficientTable {
    /// The coefficients for a kernel family and precision.
    pub fn get(&self, kernels: KernelFamily, precision: Precision) -> &Coefficients {
        match (kernels, precision.is_half()) {
            (KernelFamily::Cpu, false) => &self.cpu_f32,
            (KernelFamily::Cpu, true) => &self.cpu_half,
            (KernelFamily::Gpu, false) => &self.gpu_f32,
            (KernelFamily::Gpu, true) => &self.gpu_half,
        }
    }

    /// Mutable access, for installing fitted coefficients.
    pub fn get_mut(&mut self, kernels: KernelFamily, precision: Precision) -> &mut Coefficients {
        match (kernels, precision.is_half()) {
            (KernelFamily::Cpu, false) => &mut self.cpu_f32,
            (KernelFamily::Cpu, true) => &mut self.cpu_half,
            (KernelFamily::Gpu, false) => &mut self.gpu_f32,
            (KernelFamily::Gpu, true) => &mut self.gpu_half,
        }
    }
}

/// The coefficients that replace the stock ones while the fast kernels run, per column; `None`
/// keeps the stock column (not measured with the fast kernels yet: an over-estimate, since they
/// hold less). Kept apart from [`CoefficientTable`] so a profile that scales a stock column (the
/// SDXL refiner's wider first level) cannot leave a stale copy of it here.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct FastCoefficients {
    /// CPU, f32.
    pub cpu_f32: Option<Coefficients>,
    /// CPU, f16/bf16.
    pub cpu_half: Option<Coefficients>,
    /// GPU, f32.
    pub gpu_f32: Option<Coefficients>,
    /// GPU, f16/bf16.
    pub gpu_half: Option<Coefficients>,
}

impl FastCoefficients {
    /// The measured column for a kernel family and precision, if any.
    pub fn get(&self, kernels: KernelFamily, precision: Precision) -> Option<&Coefficients> {
        match (kernels, precision.is_half()) {
            (KernelFamily::Cpu, false) => self.cpu_f32.as_ref(),
            (KernelFamily::Cpu, true) => self.cpu_half.as_ref(),
            (KernelFamily::Gpu, false) => self.gpu_f32.as_ref(),
            (KernelFamily::Gpu, true) => self.gpu_half.as_ref(),
        }
    }
}

/// A stage's activation formula.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationModel {
    /// How many items run at once.
    pub batch: BatchRule,
    /// The dominant attention, if the stage has one whose size depends on the image.
    pub attention: Option<AttentionShape>,
    /// The coefficients with candle's stock kernels (`--no-fast-kernels`).
    pub coefficients: CoefficientTable,
    /// The coefficients with the engine's fast kernels (`sdgen_models::ops`: attention without
    /// score matrices — flash on CUDA at half precision, blocked on the CPU —, fused GroupNorm,
    /// cuDNN convolutions without column buffers), column by column where measured.
    #[serde(default)]
    pub fast: FastCoefficients,
    /// Column (im2col) elements per pixel of the stage's largest convolution call, where that
    /// buffer is large enough to count (the VAE decoder's 256-channel 3×3 convolutions at full
    /// resolution: 2,304); `None` = folded into the pixel terms.
    #[serde(default)]
    pub conv_column_elements_per_pixel: Option<usize>,
}

/// What one forward of a stage processes: the inputs of the formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationInputs {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Items in one forward (the batch dimension: with guidance, twice the images).
    pub items: usize,
    /// Images whose output is held (the decoded batch).
    pub images: usize,
    /// Attention slice size: score matrices materialised at once; `None` = all.
    #[serde(default)]
    pub attention_slice: Option<usize>,
    /// Tile (width, height) in pixels when the stage runs tile by tile.
    #[serde(default)]
    pub tile_px: Option<(usize, usize)>,
    /// The most score elements the engine materialises per attention call on the device that
    /// runs the stage ([`KernelFamily::max_score_elements`]); `None` = the CPU's.
    #[serde(default)]
    pub max_score_elements: Option<u64>,
    /// The most convolution column elements per call there ([`KernelFamily::max_column_elements`]);
    /// `None` = the CPU's.
    #[serde(default)]
    pub max_column_elements: Option<u64>,
}

impl ActivationInputs {
    /// One unsliced, untiled forward of `items` items of `width`×`height`, holding `images`.
    pub fn new(width: usize, height: usize, items: usize, images: usize) -> Self {
        Self {
            width,
            height,
            items,
            images,
            attention_slice: None,
            tile_px: None,
            max_score_elements: None,
            max_column_elements: None,
        }
    }
}

/// The formula's terms for some inputs, before the coefficients.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Features {
    /// `items · pixels` (pixels of one tile when tiled).
    pub pixel: f64,
    /// Score elements materialised at once.
    pub score: f64,
    /// Pixels of every output image.
    pub output_pixel: f64,
    /// Elements of the largest convolution column buffer built at once.
    #[serde(default)]
    pub column: f64,
}

impl ActivationModel {
    /// The formula's terms for `inputs`.
    pub fn features(&self, inputs: &ActivationInputs) -> Features {
        let (w, h) = inputs.tile_px.unwrap_or((inputs.width, inputs.height));
        let pixels = (w.min(inputs.width) * h.min(inputs.height)) as f64;
        let items = inputs.items as f64;
        let score = match &self.attention {
            Some(a) => {
                let tokens = pixels / a.pixels_per_token.max(1) as f64 + a.extra_tokens as f64;
                let all = (inputs.items * a.heads) as f64;
                let slices = inputs.attention_slice.map_or(all, |s| (s.max(1) as f64).min(all));
                let cap = inputs.max_score_elements.map_or(ENGINE_MAX_SCORE_ELEMENTS, |c| c as f64);
                (slices * tokens * tokens).min(cap)
            }
            None => 0.0,
        };
        let column = match self.conv_column_elements_per_pixel {
            Some(per_pixel) => {
                let cap = inputs.max_column_elements.map_or(ENGINE_MAX_CONV_COLUMN_ELEMENTS, |c| c as f64);
                let all = items * pixels * per_pixel as f64;
                if all < cap {
                    all
                } else {
                    (pixels * per_pixel as f64).min(cap)
                }
            }
            None => 0.0,
        };
        Features {
            pixel: items * pixels,
            score,
            output_pixel: (inputs.images * inputs.width * inputs.height) as f64,
            column,
        }
    }

    /// The coefficients for a kernel family and precision, the fast kernels on (`fast`) or off.
    pub fn coefficients_for(&self, kernels: KernelFamily, precision: Precision, fast: bool) -> &Coefficients {
        let measured_fast = if fast { self.fast.get(kernels, precision) } else { None };
        measured_fast.unwrap_or_else(|| self.coefficients.get(kernels, precision))
    }

    /// Estimated activation bytes, the fast kernels on (`fast`) or off.
    pub fn bytes(&self, kernels: KernelFamily, precision: Precision, fast: bool, inputs: &ActivationInputs) -> u64 {
        self.coefficients_for(kernels, precision, fast).apply(&self.features(inputs)).max(0.0).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet_like() -> ActivationModel {
        ActivationModel {
            batch: BatchRule::GuidedImages,
            attention: Some(AttentionShape { heads: 8, pixels_per_token: 64, extra_tokens: 0 }),
            coefficients: CoefficientTable::default(),
            fast: FastCoefficients::default(),
            conv_column_elements_per_pixel: None,
        }
    }

    #[test]
    fn features_follow_batch_slicing_and_tiles() {
        let m = unet_like();
        let f = m.features(&ActivationInputs::new(512, 512, 2, 1));
        assert_eq!(f.pixel, 2.0 * 512.0 * 512.0);
        assert_eq!(f.score, 16.0 * 4096.0 * 4096.0);
        assert_eq!(f.output_pixel, 512.0 * 512.0);
        let sliced =
            m.features(&ActivationInputs { attention_slice: Some(4), ..ActivationInputs::new(512, 512, 2, 1) });
        assert_eq!(sliced.score, 4.0 * 4096.0 * 4096.0);
        // A slice larger than the work is the work.
        let big = m.features(&ActivationInputs { attention_slice: Some(64), ..ActivationInputs::new(512, 512, 2, 1) });
        assert_eq!(big.score, f.score);
        // Past 2^30 elements the engine slices by itself: 768² with 4 images holds 2^30, not
        // 64 · 9216² = 5.4 G.
        assert_eq!(m.features(&ActivationInputs::new(768, 768, 8, 4)).score, ENGINE_MAX_SCORE_ELEMENTS);
        let tiled =
            m.features(&ActivationInputs { tile_px: Some((256, 256)), ..ActivationInputs::new(1024, 512, 1, 1) });
        assert_eq!(tiled.pixel, 65536.0);
        assert_eq!(tiled.score, 8.0 * 1024.0 * 1024.0);
        assert_eq!(tiled.output_pixel, 1024.0 * 512.0);
    }

    #[test]
    fn the_larger_moment_is_the_peak() {
        let c = Coefficients {
            bytes_per_pixel: 5000.0,
            bytes_per_pixel_at_attention: 300.0,
            bytes_per_score: 80.0,
            bytes_per_output_pixel: 48.0,
            fixed_bytes: 1e6,
            bytes_per_column_element: 0.0,
        };
        let vae = ActivationModel {
            batch: BatchRule::Images,
            attention: Some(AttentionShape { heads: 1, pixels_per_token: 64, extra_tokens: 0 }),
            coefficients: CoefficientTable::default(),
            fast: FastCoefficients::default(),
            conv_column_elements_per_pixel: None,
        };
        // 256²: the feature maps win; 1024²: the 16,384-token attention does.
        let small = vae.features(&ActivationInputs::new(256, 256, 1, 1));
        assert!(!c.attention_dominates(&small));
        assert_eq!(c.apply(&small), 1e6 + 48.0 * 65536.0 + 5000.0 * 65536.0);
        let big = vae.features(&ActivationInputs::new(1024, 1024, 1, 1));
        assert!(c.attention_dominates(&big));
        let px = 1024.0 * 1024.0;
        assert_eq!(c.apply(&big), 1e6 + 48.0 * px + 300.0 * px + 80.0 * (px / 64.0) * (px / 64.0));
        // At 2048² the engine chunks the 65,536² scores: 2^30 at a time.
        let huge = vae.features(&ActivationInputs::new(2048, 2048, 1, 1));
        assert_eq!(huge.score, ENGINE_MAX_SCORE_ELEMENTS);
        assert_eq!(c.scaled(2.0).apply(&big), 2.0 * c.apply(&big));
    }
}
