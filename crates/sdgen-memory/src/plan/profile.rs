//! Model families as data: which components exist (and which tensors of the model folder each
//! loads), the stages in order with the components resident in each, each stage's activation
//! formula and the memory options it admits. A new family is a new [`FamilyProfile`]
//! constructor, not new planner code.

use serde::Serialize;

use super::activation::{ActivationModel, AttentionShape, BatchRule, CoefficientTable, Coefficients, FastCoefficients};

/// A component the planner places: a part of one of the model folder's components.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentSpec {
    /// The planner's name (`vae_decoder`).
    pub name: &'static str,
    /// The model folder's component it comes from (`vae`).
    pub source: &'static str,
    /// The tensors it loads, by name prefix (`decoder.`, `post_quant_conv.`); empty = all. The
    /// first prefix must match at least one tensor, or the model lacks the component.
    pub prefixes: &'static [&'static str],
}

/// VAE tiling as a family supports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TilingSpec {
    /// Tile sides in pixels, largest (fastest, best) first. The first is the size the VAE was
    /// trained at (diffusers' `tile_sample_min_size`); smaller ones are last resorts.
    pub tile_px: Vec<usize>,
    /// Overlap between neighbouring tiles, as a fraction of the tile (diffusers' 0.25), blended.
    pub overlap: f64,
}

/// The memory options a stage admits.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct StageOptionsSpec {
    /// Attention slicing (its formula must have an attention term).
    pub attention_slicing: bool,
    /// Running the batch's images one at a time (VAE slicing).
    pub image_slicing: bool,
    /// Running tile by tile (VAE tiling).
    pub tiling: Option<TilingSpec>,
    /// Running on the host (CPU) while the GPU holds the other stages (text encoders).
    pub host_offload: bool,
}

impl StageOptionsSpec {
    /// Whether the stage runs one half of the VAE (it admits VAE slicing or tiling): the engine
    /// runs the VAE's encoder and decoder with one set of options
    /// ([`StageOptions::vae_shared`](super::StageOptions::vae_shared)).
    pub fn is_vae(&self) -> bool {
        self.image_slicing || self.tiling.is_some()
    }
}

/// The tensor whose width stands for a stage's activations. Its coefficients are measured on the
/// family's standard model; a model of the same architecture at another width (a pruned or
/// distilled one, the tests' tiny models) holds feature maps in proportion, so the estimate
/// scales by `width / standard` (down to [`MIN_SCALED_ACTIVATION_BYTES`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageWidth {
    /// Name endings of the tensor (diffusers' and the single-file layouts' names), the first found
    /// in the stage's components taken.
    pub tensors: &'static [&'static str],
    /// Which of its dimensions is the width.
    pub axis: usize,
    /// That dimension in the standard model the coefficients were measured on.
    pub standard: usize,
}

/// The least a stage whose width is scaled down is estimated to add above the baseline: what any
/// stage allocates besides its feature maps (the thread pool's and the GEMMs' packing buffers,
/// the allocator's new arenas, what earlier stages left in its pools): the tiny models' stages measure
/// 1.5–5.6 MB above the run's starting baseline on the CPU, their peaks 14–19 MB in all.
pub const MIN_SCALED_ACTIVATION_BYTES: u64 = 8 << 20;

impl StageWidth {
    /// A CLIP or T5 text encoder: its token embedding's width.
    pub const fn text(standard: usize) -> Self {
        Self { tensors: &["token_embedding.weight", "shared.weight"], axis: 1, standard }
    }

    /// A UNet: its first convolution's output channels (`input_blocks.0.0` in single files).
    pub const fn unet(standard: usize) -> Self {
        Self { tensors: &["conv_in.weight", "input_blocks.0.0.weight"], axis: 0, standard }
    }

    /// An MMDiT: its patch embedding's output width.
    pub const fn mmdit(standard: usize) -> Self {
        Self { tensors: &["pos_embed.proj.weight", "x_embedder.proj.weight"], axis: 0, standard }
    }

    /// The VAE's decoder: its first convolution's output channels (512 in SD's KL VAE).
    pub const DECODER: Self = Self { tensors: &["decoder.conv_in.weight"], axis: 0, standard: 512 };

    /// The VAE's encoder: its first convolution's output channels (128 in SD's KL VAE).
    pub const ENCODER: Self = Self { tensors: &["encoder.conv_in.weight"], axis: 0, standard: 128 };
}

/// One stage of a generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageSpec {
    /// Its name (`text_encoder`, `denoise`, `decode`), as the engine's stage labels.
    pub name: &'static str,
    /// The components resident during it (loaded for the stage only, then dropped).
    pub components: Vec<&'static str>,
    /// The activation formula.
    pub activation: ActivationModel,
    /// The options it admits.
    pub options: StageOptionsSpec,
    /// Whether it runs only for image-to-image (encoding the init image).
    pub img2img_only: bool,
    /// What its activations scale with, if a model of another width can be told apart.
    pub width: Option<StageWidth>,
}

/// A model family.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FamilyProfile {
    /// The engine's short family name (`sd15`, as in `sdgen::loading::FAMILIES`).
    pub id: &'static str,
    /// Display name ("SD 1.5").
    pub name: &'static str,
    /// Its components.
    pub components: Vec<ComponentSpec>,
    /// Its stages, in the order they run.
    pub stages: Vec<StageSpec>,
    /// Image sides must be multiples of this (8 for SD 1.5: the VAE's factor).
    pub size_multiple: usize,
    /// `--model` value of a smaller family to suggest when nothing fits (none for the smallest).
    pub smaller_model: Option<&'static str>,
    /// Its row of the seed's requirement table ([`crate::MODEL_REQUIREMENTS`]).
    pub requirement: crate::ModelClass,
}

impl FamilyProfile {
    /// The profile of the engine's family `id` (`sd15`), if the planner knows it.
    pub fn for_family(id: &str) -> Option<Self> {
        match id {
            "sd15" => Some(Self::sd15()),
            "sdxl" => Some(Self::sdxl()),
            "sdxl-refiner" => Some(Self::sdxl_refiner()),
            "sd35-large" => Some(Self::sd35_large()),
            "sd35-medium" => Some(Self::sd35_medium()),
            _ => None,
        }
    }

    /// SDXL base: CLIP ViT-L and OpenCLIP bigG (each a stage of its own: the engine loads one
    /// at a time), the 2.6B UNet, SD's KL VAE (f = 8).
    ///
    /// Coefficients: SD 1.5's, per pixel, until SDXL's are measured at full size. The VAE is SD
    /// 1.5's architecture; the UNet's first level has SD 1.5's 320 channels at the same
    /// resolution (its feature-map terms carry over), and its largest attention is at the second
    /// level (16×16 pixels per token, 10 heads of 64), the first having none.
    pub fn sdxl() -> Self {
        let sd15 = Self::sd15();
        let stage = |name: &str| sd15.stage(name).expect("SD 1.5 has the stage").clone();
        let mut denoise = stage("denoise");
        denoise.activation.attention = Some(AttentionShape { heads: 10, pixels_per_token: 256, extra_tokens: 0 });
        // With the fast kernels SDXL's UNet holds 170–184 bytes per item-pixel in half precision
        // against SD 1.5's 254 (H100, 768²–1280², 2 and 4 items, `sdxl_gpu_fast_peaks.jsonl`): its
        // full-resolution level has no attention.
        if let Some(half) = denoise.activation.fast.gpu_half.as_mut() {
            half.bytes_per_pixel *= 0.72;
        }
        let text_encoder = stage("text_encoder");
        let text_encoder_2 = StageSpec {
            name: "text_encoder_2",
            components: vec!["text_encoder_2"],
            width: Some(StageWidth::text(1280)),
            ..text_encoder.clone()
        };
        Self {
            id: "sdxl",
            name: "SDXL",
            components: vec![
                ComponentSpec { name: "text_encoder", source: "text_encoder", prefixes: &[] },
                ComponentSpec { name: "text_encoder_2", source: "text_encoder_2", prefixes: &[] },
                ComponentSpec { name: "unet", source: "unet", prefixes: &[] },
                ComponentSpec { name: "vae_encoder", source: "vae", prefixes: &["encoder.", "quant_conv."] },
                ComponentSpec { name: "vae_decoder", source: "vae", prefixes: &["decoder.", "post_quant_conv."] },
            ],
            stages: vec![text_encoder, text_encoder_2, stage("encode_image"), denoise, stage("decode")],
            size_multiple: 8,
            smaller_model: Some("sd15"),
            requirement: crate::ModelClass::Sdxl,
        }
    }

    /// The SDXL refiner: OpenCLIP bigG only, its 2.3B UNet (largest attention at the second
    /// level: 12 heads of 64), SDXL's VAE. Coefficients as [`Self::sdxl`].
    pub fn sdxl_refiner() -> Self {
        let base = Self::sdxl();
        let stage = |name: &str| base.stage(name).expect("SDXL has the stage").clone();
        let mut denoise = stage("denoise");
        denoise.activation.attention = Some(AttentionShape { heads: 12, pixels_per_token: 256, extra_tokens: 0 });
        denoise.width = Some(StageWidth::unet(384));
        // Its first level is wider (384 channels against 320): measured on an H200 at 1024²
        // (bf16, 1.49 GB above its weights), 1.66× the base's per-pixel term; f32 scaled alike.
        let gpu = &mut denoise.activation.coefficients;
        gpu.gpu_half.bytes_per_pixel *= 1.66;
        gpu.gpu_f32.bytes_per_pixel *= 1.66;
        // The fast kernels' columns alike (not measured on the refiner yet).
        let fast = &mut denoise.activation.fast;
        for c in [&mut fast.gpu_half, &mut fast.gpu_f32].into_iter().flatten() {
            c.bytes_per_pixel *= 1.66;
        }
        Self {
            id: "sdxl-refiner",
            name: "SDXL refiner",
            components: base.components.iter().filter(|c| c.name != "text_encoder").cloned().collect(),
            stages: vec![stage("text_encoder_2"), stage("encode_image"), denoise, stage("decode")],
            size_multiple: 8,
            smaller_model: None,
            requirement: crate::ModelClass::Sdxl,
        }
    }

    /// SD 3.5 Large: CLIP-L, OpenCLIP bigG and T5-XXL (each a stage of its own, T5 the one worth
    /// keeping on the host), the 8.1B MMDiT (38 heads over the image tokens — one per 16×16
    /// pixels — plus the 333 text tokens of the joint attention), SD's KL VAE with 16 latent
    /// channels (the decoder's widths are SDXL's).
    pub fn sd35_large() -> Self {
        Self::sd35("sd35-large", "SD 3.5 Large", 38, 2432, crate::ModelClass::Sd35Large)
    }

    /// SD 3.5 Medium: the same stages, a 2.5B MMDiT-X (24 heads, width 1536; its extra self-
    /// attention over the image tokens runs after the joint one, not beside it).
    pub fn sd35_medium() -> Self {
        Self::sd35("sd35-medium", "SD 3.5 Medium", 24, 1536, crate::ModelClass::Sd35Medium)
    }

    /// The SD 3.5 profile for an MMDiT of `heads` heads and `width` channels.
    ///
    /// Text encoders: T5-XXL over 256 tokens holds its 10240-wide gated FFN and 64 heads of
    /// 256² scores (f32 softmax) for one prompt: about 64 MiB. The MMDiT's feature maps, per
    /// image token: the block input, its modulated norm, q/k/v and the attention output
    /// (≈ 6 × width), the 4 × width GELU MLP with its tanh-GELU temporaries (≈ 10 × width):
    /// about 16 × width elements per 256 pixels from the architecture. The GPU's half-precision
    /// column with the fast kernels is fitted to SD 3.5 Large at 1024² with the CFG batch (H100,
    /// 2026-12-07, `tools/gpu/low_memory.sh`'s resident run, BENCHMARKS.md session 8): the MMDiT
    /// held 1.17 GB above its weights — 25.5 × width elements per 256 pixels, the residual
    /// stream, the modulated copies and the MLP's hidden activation living at once (its GELU runs
    /// in place: 1.44 GB, 32 × width, while it kept input and output) — and its streamed runs
    /// 1.13–1.14 GB; every text encoder about 150 MB
    /// (T5: 270 MB) above its weights, the cuBLAS workspaces and the pool's rounding included.
    /// Medium takes the same per-width terms (its extra attention runs after the joint one).
    fn sd35(id: &'static str, name: &'static str, heads: usize, width: usize, requirement: crate::ModelClass) -> Self {
        const MIB: f64 = 1024.0 * 1024.0;
        let sdxl = Self::sdxl();
        let stage = |name: &str| sdxl.stage(name).expect("SDXL has the stage").clone();
        let clip = stage("text_encoder");
        let mut t5 = StageSpec {
            name: "text_encoder_3",
            components: vec!["text_encoder_3"],
            width: Some(StageWidth::text(4096)),
            ..clip.clone()
        };
        let t5_fixed = Coefficients { fixed_bytes: 64.0 * MIB, ..Default::default() };
        t5.activation.coefficients =
            CoefficientTable { cpu_f32: t5_fixed, cpu_half: t5_fixed, gpu_f32: t5_fixed, gpu_half: t5_fixed };
        let fixed = |bytes: f64| Coefficients { fixed_bytes: bytes, ..Default::default() };
        t5.activation.fast = FastCoefficients { gpu_half: Some(fixed(270e6)), ..Default::default() };
        // CLIP-L and bigG on the GPU: their measured constant (the bigG's sequence of 77 tokens
        // is too short for anything to grow with).
        let mut clip = clip;
        clip.activation.fast.gpu_half = Some(fixed(150e6));
        let per_pixel = |bytes: f64| 16.0 * width as f64 * bytes / 256.0;
        let per_pixel_measured = |bytes: f64| 25.5 * width as f64 * bytes / 256.0;
        // The text tokens' share of every activation, whatever the image size.
        let text_fixed = |bytes: f64| 333.0 * 16.0 * width as f64 * bytes + 128.0 * MIB;
        let maps = |bytes: f64, score: f64| Coefficients {
            bytes_per_pixel: per_pixel(bytes),
            bytes_per_pixel_at_attention: per_pixel(bytes) * 0.5,
            bytes_per_score: score,
            fixed_bytes: text_fixed(bytes),
            ..Default::default()
        };
        let denoise = StageSpec {
            name: "denoise",
            components: vec!["transformer"],
            activation: ActivationModel {
                batch: BatchRule::GuidedImages,
                attention: Some(AttentionShape { heads, pixels_per_token: 256, extra_tokens: 333 }),
                conv_column_elements_per_pixel: None,
                // The fast kernels hold no score matrix at half precision (flash on CUDA) or on
                // the CPU (blocked); f32 on CUDA scores through cuBLAS in bounded chunks.
                fast: FastCoefficients {
                    cpu_f32: Some(maps(4.0, 0.0)),
                    gpu_f32: Some(maps(4.0, 8.0)),
                    gpu_half: Some(Coefficients { bytes_per_pixel: per_pixel_measured(2.0), ..maps(2.0, 0.0) }),
                    ..Default::default()
                },
                coefficients: CoefficientTable {
                    cpu_f32: maps(4.0, 8.0),
                    cpu_half: maps(2.0, 12.0),
                    gpu_f32: maps(4.0, 8.0),
                    gpu_half: maps(2.0, 8.0),
                },
            },
            options: StageOptionsSpec { attention_slicing: true, ..Default::default() },
            img2img_only: false,
            width: Some(StageWidth::mmdit(width)),
        };
        let text_encoder_2 = StageSpec {
            name: "text_encoder_2",
            components: vec!["text_encoder_2"],
            width: Some(StageWidth::text(1280)),
            ..clip.clone()
        };
        Self {
            id,
            name,
            components: vec![
                ComponentSpec { name: "text_encoder", source: "text_encoder", prefixes: &[] },
                ComponentSpec { name: "text_encoder_2", source: "text_encoder_2", prefixes: &[] },
                ComponentSpec { name: "text_encoder_3", source: "text_encoder_3", prefixes: &[] },
                ComponentSpec { name: "transformer", source: "transformer", prefixes: &[] },
                ComponentSpec { name: "vae_encoder", source: "vae", prefixes: &["encoder.", "quant_conv."] },
                ComponentSpec { name: "vae_decoder", source: "vae", prefixes: &["decoder.", "post_quant_conv."] },
            ],
            stages: vec![clip, text_encoder_2, t5, stage("encode_image"), denoise, stage("decode")],
            size_multiple: 16,
            smaller_model: Some("sdxl"),
            requirement,
        }
    }

    /// The component spec called `name`.
    pub fn component(&self, name: &str) -> Option<&ComponentSpec> {
        self.components.iter().find(|c| c.name == name)
    }

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Mutable access to a stage, e.g. to install fitted coefficients.
    pub fn stage_mut(&mut self, name: &str) -> Option<&mut StageSpec> {
        self.stages.iter_mut().find(|s| s.name == name)
    }

    /// Stable Diffusion 1.5: CLIP ViT-L, the 860M UNet, the KL VAE (f = 8).
    ///
    /// Coefficients. CPU f32: fitted to full-size measurements on the CPU
    /// (`crates/sdgen/tests/activation_peaks.rs`; the measurements are
    /// `crates/sdgen-memory/tests/data/sd15_cpu_peaks.jsonl`, and `tests/plan.rs` holds the
    /// profile to them). Terms the measurements cannot show, and the other columns, are derived
    /// from the architecture and candle 0.11.1's kernels until GPU measurements replace them:
    ///
    /// - attention (`sdgen_models::attention`) materialises the scores, scales them, and takes
    ///   the softmax in f32: 8 bytes per score element at f32 (scores + probabilities), 12 at
    ///   half precision (half scores, their f32 copy, f32 probabilities, half probabilities);
    /// - candle's GroupNorm keeps four f32 copies of its input beside it (≈ 20 bytes per element
    ///   at either precision): the VAE decoder's full-resolution 256-channel norms make its
    ///   feature-map peak on the CPU, ~5 KB per pixel (measured: 5.05 KB);
    /// - on GPUs candle convolves by full im2col: the decoder's 3×3 convolutions over 256
    ///   channels at full resolution hold a 2,304-element column per pixel beside input and
    ///   output, ~3,100 elements per pixel; the UNet's 640-channel ones at full latent size
    ///   5,760 per latent cell;
    /// - half precision halves the feature maps but not the f32 internals: its UNet pixel terms
    ///   are taken as 0.6 of f32's, its VAE ones (GroupNorm-bound) as equal on the CPU.
    pub fn sd15() -> Self {
        const MIB: f64 = 1024.0 * 1024.0;
        let c = |px: f64, px_at_attention: f64, score: f64, out_px: f64, fixed: f64| Coefficients {
            bytes_per_pixel: px,
            bytes_per_pixel_at_attention: px_at_attention,
            bytes_per_score: score,
            bytes_per_output_pixel: out_px,
            fixed_bytes: fixed,
            bytes_per_column_element: 0.0,
        };
        let text_encoder = ActivationModel {
            batch: BatchRule::OnePrompt,
            attention: None,
            conv_column_elements_per_pixel: None,
            fast: FastCoefficients::default(),
            coefficients: CoefficientTable {
                // Measured 5 MB at f32 on the CPU (77 tokens, one prompt).
                cpu_f32: c(0.0, 0.0, 0.0, 0.0, 16.0 * MIB),
                cpu_half: c(0.0, 0.0, 0.0, 0.0, 16.0 * MIB),
                // Measured on an H100 (sdgen-bench, 2026-11-27): 11-22 MB above the weights.
                gpu_f32: c(0.0, 0.0, 0.0, 0.0, 24.0 * MIB),
                gpu_half: c(0.0, 0.0, 0.0, 0.0, 24.0 * MIB),
            },
        };
        // Full latent resolution (8×8 pixels per token), 8 heads: the first level's
        // self-attention, 16× the next level's scores.
        let u = SD15_UNET_CPU_F32;
        let denoise = ActivationModel {
            batch: BatchRule::GuidedImages,
            attention: Some(AttentionShape { heads: 8, pixels_per_token: 64, extra_tokens: 0 }),
            conv_column_elements_per_pixel: None,
            // The fast kernels, measured (`tests/data/sd15_{cpu,gpu}_fast_peaks.jsonl`): the CPU's
            // blocked attention and CUDA's flash attention (half precision) hold no score
            // matrix, so only the feature maps grow with the image; f32 on CUDA still scores
            // through cuBLAS (at most 2^26 elements a call).
            fast: FastCoefficients {
                cpu_f32: Some(SD15_UNET_CPU_F32_FAST),
                cpu_half: Some(SD15_UNET_CPU_HALF_FAST),
                gpu_f32: Some(c(706.0, 0.0, 8.0, 0.0, 0.0)),
                gpu_half: Some(c(254.0, 0.0, 0.0, 0.0, 0.0)),
            },
            coefficients: CoefficientTable {
                cpu_f32: u,
                cpu_half: c(0.6 * u.bytes_per_pixel, 0.6 * u.bytes_per_pixel_at_attention, 12.0, 0.0, u.fixed_bytes),
                // Fitted to H100 measurements (sdgen-bench, 2026-11-27; the data and the check
                // are `tests/data/sd15_gpu_peaks.jsonl` and `tests/plan.rs`): 512² and 768², 1
                // and 4 images. On GPUs the engine scores at most 2^26 elements per attention
                // call (8 bytes each: the f32 scores beside their f32 softmax), so the feature
                // maps, not the attention, set the peak at these sizes.
                gpu_f32: c(587.0, 0.0, 8.0, 0.0, 553.0 * MIB),
                gpu_half: c(335.0, 0.0, 8.0, 0.0, 303.0 * MIB),
            },
        };
        // The mid block's single-head attention at latent resolution.
        let vae_attention = Some(AttentionShape { heads: 1, pixels_per_token: 64, extra_tokens: 0 });
        let d = SD15_DECODE_CPU_F32;
        let decode = ActivationModel {
            batch: BatchRule::Images,
            attention: vae_attention,
            // 256 channels × 9 taps: the full-resolution 3×3 convolutions after the last upsampling.
            conv_column_elements_per_pixel: Some(256 * 9),
            // The fast kernels, measured (`tests/data/sd15_{cpu,gpu}_fast_peaks.jsonl`,
            // `sdxl_gpu_fast_peaks.jsonl`). CUDA: cuDNN builds no column buffer; in f32 its
            // tensor-core kernels take a workspace of each convolution's own tensors (NHWC
            // copies), which the per-pixel term absorbs, while half precision runs channels-last
            // and needs none; the 512-wide mid attention still scores through cuBLAS. CPU: direct 3×3 convolutions (an
            // 8 MiB band of buffered input rows and the packed weights, ≤ 9.4 MB; 2026-12-07 the
            // 512² decode's peak measured 1.06 GB against the unfolded path's 1.05) and 16 MiB column
            // bands for the others, and the blocked attention, so the feature maps alone grow
            // with the image.
            //
            // The decoded image is held whole however it is decoded (`pipeline::stages::decode`):
            // tiles are stitched into it (the cropped rows, then their concatenation), then
            // `(x / 2 + 0.5).clamp(0, 1)` and its f32 copy for the host — 18 bytes per output
            // pixel in half precision (3 channels: 6 + 12), 24 in f32 (12 + 12). Untiled it
            // was inside the per-pixel term, which gives it back (the fitted sums are
            // unchanged); tiled it is most of the stage: `--quality 4k-ultra`'s 4096² decode
            // in 512 px tiles measured 0.88 GiB with its weights on an H100 (2026-12-07,
            // `tools/gpu/presets_4k.sh`), the tile's 1,700 B/px + 80 MiB alone 0.63 of it.
            fast: FastCoefficients {
                cpu_f32: Some(SD15_DECODE_CPU_F32_FAST),
                cpu_half: Some(SD15_DECODE_CPU_HALF_FAST),
                gpu_f32: Some(c(3_430.0 - 24.0, d.bytes_per_pixel_at_attention, 8.0, 24.0, 4.0 * MIB)),
                // Half precision runs channels-last on cuDNN: no NHWC copies in the workspace
                // (H100, 2026-12-07: 512²–1280², 1–4 images, SD 1.5's and SDXL's decoders).
                gpu_half: Some(c(1_700.0 - 18.0, 0.6 * d.bytes_per_pixel_at_attention, 8.0, 18.0, 80.0 * MIB)),
            },
            coefficients: CoefficientTable {
                cpu_f32: d,
                cpu_half: c(d.bytes_per_pixel, 0.6 * d.bytes_per_pixel_at_attention, 12.0, 48.0, d.fixed_bytes),
                // Fitted to H100 measurements (sdgen-bench, 2026-11-27) at 512² and 768², 1 and 4
                // images: the feature maps and norms per pixel, plus the largest convolution's
                // column buffer at its element size (candle builds it whole on GPUs, at most
                // 2^28 elements per call on GPUs); the attention terms are derived as on the CPU.
                // (f32 holds ~1 GB more while decoding 4 images one at a time at 768² than for
                // one image: counted per output pixel.)
                gpu_f32: Coefficients {
                    bytes_per_column_element: 4.0,
                    ..c(5_525.0, d.bytes_per_pixel_at_attention, 8.0, 300.0, 580.0 * MIB)
                },
                gpu_half: Coefficients {
                    bytes_per_column_element: 2.0,
                    ..c(4_986.0, 0.6 * d.bytes_per_pixel_at_attention, 8.0, 48.0, 0.0)
                },
            },
        };
        let e = SD15_ENCODE_CPU_F32;
        let encode = ActivationModel {
            batch: BatchRule::Images,
            attention: vae_attention,
            conv_column_elements_per_pixel: None,
            // The fast kernels on CUDA in f32 (cuDNN, channels-first; SDXL's img2img encodes in
            // f32 whatever the run's dtype): fitted to the mean of `--quality 4k`'s 2048² encode
            // in two runs, 8.45 and 8.41 GiB with the 137 MB of weights (H100, 2026-12-07,
            // `tools/gpu/presets_4k.sh`: the 4k preset's hires pass and 4k-ultra's first one;
            // the only fast-kernel encode measured), the decoder's f32 constant taken for the
            // fixed term. (The stock column's one point, 1024² in `sdxl_gpu_peaks.jsonl`, was
            // measured with candle's im2col convolutions.) The image is held whole on
            // the device in the run's dtype and in f32 (6 + 12 bytes a pixel in a half-precision
            // run), tiled or not. Half precision: not measured (the stock column).
            fast: FastCoefficients {
                cpu_f32: Some(SD15_ENCODE_CPU_F32_FAST),
                cpu_half: Some(SD15_ENCODE_CPU_HALF_FAST),
                gpu_f32: Some(c(2_106.0, e.bytes_per_pixel_at_attention, 8.0, 18.0, 4.0 * MIB)),
                ..Default::default()
            },
            coefficients: CoefficientTable {
                cpu_f32: e,
                cpu_half: c(e.bytes_per_pixel, 0.6 * e.bytes_per_pixel_at_attention, 12.0, 0.0, e.fixed_bytes),
                // f32: fitted to one H200 measurement (SDXL's VAE — the same architecture — encoding
                // a 1024² image in f32, as SDXL's img2img upcasts it: 5.06 GB above its weights;
                // sdgen-bench, 2026-11-27). Half: 0.9 of it, the decoder's measured ratio, until
                // measured.
                gpu_f32: c(4_770.0, e.bytes_per_pixel_at_attention, 8.0, 0.0, 128.0 * MIB),
                gpu_half: c(4_300.0, 0.6 * e.bytes_per_pixel_at_attention, 8.0, 0.0, 128.0 * MIB),
            },
        };
        let vae_tiling = TilingSpec { tile_px: vec![512, 256], overlap: 0.25 };
        Self {
            id: "sd15",
            name: "SD 1.5",
            components: vec![
                ComponentSpec { name: "text_encoder", source: "text_encoder", prefixes: &[] },
                ComponentSpec { name: "unet", source: "unet", prefixes: &[] },
                ComponentSpec { name: "vae_encoder", source: "vae", prefixes: &["encoder.", "quant_conv."] },
                ComponentSpec { name: "vae_decoder", source: "vae", prefixes: &["decoder.", "post_quant_conv."] },
            ],
            stages: vec![
                StageSpec {
                    name: "text_encoder",
                    components: vec!["text_encoder"],
                    activation: text_encoder,
                    options: StageOptionsSpec { host_offload: true, ..Default::default() },
                    img2img_only: false,
                    width: Some(StageWidth::text(768)),
                },
                StageSpec {
                    name: "encode_image",
                    components: vec!["vae_encoder"],
                    activation: encode,
                    options: StageOptionsSpec {
                        image_slicing: true,
                        tiling: Some(vae_tiling.clone()),
                        ..Default::default()
                    },
                    img2img_only: true,
                    width: Some(StageWidth::ENCODER),
                },
                StageSpec {
                    name: "denoise",
                    components: vec!["unet"],
                    activation: denoise,
                    options: StageOptionsSpec { attention_slicing: true, ..Default::default() },
                    img2img_only: false,
                    width: Some(StageWidth::unet(320)),
                },
                StageSpec {
                    name: "decode",
                    components: vec!["vae_decoder"],
                    activation: decode,
                    options: StageOptionsSpec { image_slicing: true, tiling: Some(vae_tiling), ..Default::default() },
                    img2img_only: false,
                    width: Some(StageWidth::DECODER),
                },
            ],
            size_multiple: 8,
            smaller_model: None,
            requirement: crate::ModelClass::Sd15,
        }
    }
}

/// SD 1.5's UNet, CPU, f32. Fitted: the attention terms and the constant (attention peaks in
/// every unsliced run). Derived: the feature-map peak outside attention (the GEGLU MLP and the
/// skips at full latent size, ~7,000 f32 elements per latent cell).
pub const SD15_UNET_CPU_F32: Coefficients = Coefficients {
    bytes_per_pixel: 450.0,
    bytes_per_pixel_at_attention: 225.0,
    bytes_per_score: 8.0,
    bytes_per_output_pixel: 0.0,
    fixed_bytes: 61.0 * 1048576.0,
    bytes_per_column_element: 0.0,
};

/// SD 1.5's UNet, CPU, f32, with the fast kernels: fitted to full-size measurements of one
/// forward at 256²–512², 1 and 2 items (`crates/sdgen/tests/activation_peaks.rs` with the fast
/// paths on; `tests/data/sd15_cpu_fast_peaks.jsonl`). The blocked attention keeps its scores in
/// cache-sized blocks and the convolution's columns come in 16 MiB bands, so no term grows with the
/// token count squared: the feature maps (the GEGLU MLP and the skips) set the peak at every size.
pub const SD15_UNET_CPU_F32_FAST: Coefficients = Coefficients {
    bytes_per_pixel: 566.0,
    bytes_per_pixel_at_attention: 0.0,
    bytes_per_score: 0.0,
    bytes_per_output_pixel: 0.0,
    fixed_bytes: 0.0,
    bytes_per_column_element: 0.0,
};

/// SD 1.5's VAE decoder, CPU, f32, with the fast kernels: fitted to full-size decodes at 256²–768²,
/// 1 and 2 images (`tests/data/sd15_cpu_fast_peaks.jsonl`); the blocked attention holds no score
/// matrix and the convolution's column bands are bounded, so the feature maps set the peak.
pub const SD15_DECODE_CPU_F32_FAST: Coefficients = Coefficients {
    bytes_per_pixel: 3060.0,
    bytes_per_pixel_at_attention: 0.0,
    bytes_per_score: 0.0,
    bytes_per_output_pixel: 48.0,
    fixed_bytes: 36.0 * 1048576.0,
    bytes_per_column_element: 0.0,
};

/// SD 1.5's VAE encoder, CPU, f32, with the fast kernels (image-to-image): as the decoder.
pub const SD15_ENCODE_CPU_F32_FAST: Coefficients = Coefficients {
    bytes_per_pixel: 1970.0,
    bytes_per_pixel_at_attention: 0.0,
    bytes_per_score: 0.0,
    bytes_per_output_pixel: 0.0,
    fixed_bytes: 0.0,
    bytes_per_column_element: 0.0,
};

/// SD 1.5's UNet, CPU, half precision, with the fast kernels: fitted to full-size bf16 forwards at
/// 256²–768², 1 and 2 items (`tests/data/sd15_cpu_bf16_fast_peaks.jsonl`).
pub const SD15_UNET_CPU_HALF_FAST: Coefficients =
    Coefficients { bytes_per_pixel: 275.0, fixed_bytes: 11.3 * 1048576.0, ..SD15_UNET_CPU_F32_FAST };

/// SD 1.5's VAE decoder, CPU, half precision, with the fast kernels: fitted to full-size bf16
/// decodes at 256²–768², 1 and 2 images (`tests/data/sd15_cpu_bf16_fast_peaks.jsonl`); the output
/// image is held in bf16 and in f32 (18 bytes a pixel).
pub const SD15_DECODE_CPU_HALF_FAST: Coefficients = Coefficients {
    bytes_per_pixel: 2600.0,
    bytes_per_output_pixel: 18.0,
    fixed_bytes: 4.4 * 1048576.0,
    ..SD15_DECODE_CPU_F32_FAST
};

/// SD 1.5's VAE encoder, CPU, half precision, with the fast kernels: as the decoder.
pub const SD15_ENCODE_CPU_HALF_FAST: Coefficients =
    Coefficients { bytes_per_pixel: 1416.0, fixed_bytes: 32.1 * 1048576.0, ..SD15_ENCODE_CPU_F32_FAST };

/// SD 1.5's VAE decoder, CPU, f32. Fitted: the feature-map peak and the constant (the
/// convolutions peak up to 768², the sizes measured). Derived: the mid attention's terms (its
/// 512-channel maps at latent size, f32 scores + probabilities) and the output images (f32 plus
/// the conversion to bytes, 48 bytes per pixel).
pub const SD15_DECODE_CPU_F32: Coefficients = Coefficients {
    bytes_per_pixel: 5050.0,
    bytes_per_pixel_at_attention: 320.0,
    bytes_per_score: 8.0,
    bytes_per_output_pixel: 48.0,
    fixed_bytes: 203.0 * 1048576.0,
    bytes_per_column_element: 0.0,
};

/// SD 1.5's VAE encoder, CPU, f32 (image-to-image). Fitted and derived as the decoder.
pub const SD15_ENCODE_CPU_F32: Coefficients = Coefficients {
    bytes_per_pixel: 3080.0,
    bytes_per_pixel_at_attention: 320.0,
    bytes_per_score: 8.0,
    bytes_per_output_pixel: 0.0,
    fixed_bytes: 7.0 * 1048576.0,
    bytes_per_column_element: 0.0,
};
