//! What the planner is asked: a model (profile + manifest), a generation (size, images,
//! guidance), where it runs, the memory it may use, and how to trade speed for memory.

use serde::{Deserialize, Serialize};

use super::activation::KernelFamily;
use super::error::flag_name;
use super::manifest::{ModelManifest, Precision};
use super::planner::Tiling;
use super::profile::FamilyProfile;
use super::quantised::QuantisedWeights;
use super::stream::StreamableBlocks;

/// The fraction of the budget kept free by default: estimates are fits, allocators fragment,
/// and other processes move.
pub const DEFAULT_SAFETY_MARGIN: f64 = 0.10;

/// `--memory-mode`: how the planner trades speed for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMode {
    /// The default: the same as [`MemoryMode::Balanced`].
    #[default]
    Auto,
    /// Only options that cost no speed (VAE slicing) and running the images in several batches;
    /// refuses rather than slice attention, tile the VAE, move encoders to the CPU, stream blocks
    /// or quantise the weights.
    Fast,
    /// The fastest plan that fits, using every option when needed.
    Balanced,
    /// The leanest plan, even when a faster one fits: one image per batch and, per stage, the
    /// option set with the smallest estimated peak (ties to the faster one: an option that
    /// saves nothing, such as attention slicing on a GPU whose engine already chunks the scores,
    /// is left off), for sharing the machine or a budget the estimates may overrun. Where nothing
    /// fits at full precision, the leanest quantised weights (the planner's last rung).
    Low,
}

impl MemoryMode {
    /// The names `--memory-mode` takes.
    pub const NAMES: [&'static str; 4] = ["auto", "fast", "balanced", "low"];

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            MemoryMode::Auto => "auto",
            MemoryMode::Fast => "fast",
            MemoryMode::Balanced => "balanced",
            MemoryMode::Low => "low",
        }
    }
}

impl std::fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MemoryMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(MemoryMode::Auto),
            "fast" => Ok(MemoryMode::Fast),
            "balanced" => Ok(MemoryMode::Balanced),
            "low" => Ok(MemoryMode::Low),
            _ => Err(format!("--memory-mode {s} is not one of {}", Self::NAMES.join(", "))),
        }
    }
}

/// What kind of memory the budget is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// The CPU: the budget is host RAM.
    Cpu,
    /// A discrete GPU (CUDA): the budget is device memory; stages may run on the host instead.
    DiscreteGpu,
    /// A GPU sharing host memory (Apple Silicon): the budget is process memory.
    UnifiedGpu,
}

impl DeviceKind {
    /// Whose kernels run device stages.
    pub fn kernels(self) -> KernelFamily {
        match self {
            DeviceKind::Cpu => KernelFamily::Cpu,
            DeviceKind::DiscreteGpu | DeviceKind::UnifiedGpu => KernelFamily::Gpu,
        }
    }

    /// Short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "CPU",
            DeviceKind::DiscreteGpu => "GPU",
            DeviceKind::UnifiedGpu => "GPU (unified memory)",
        }
    }
}

/// Where the budget's figure came from, for messages and the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    /// The user's `--max-memory`.
    MaxMemory,
    /// The GPU's free memory, as its driver reported it.
    GpuFree,
    /// The system's available memory (RAM the OS can hand out without swapping).
    SystemAvailable,
    /// The room under this process's memory limit (`ulimit -v`, a cgroup's `memory.max`), where
    /// that is less than the rest.
    ProcessLimit,
}

impl BudgetSource {
    /// Short label for messages.
    pub fn label(self) -> &'static str {
        match self {
            BudgetSource::MaxMemory => "--max-memory",
            BudgetSource::GpuFree => "free GPU memory",
            BudgetSource::SystemAvailable => "available RAM",
            BudgetSource::ProcessLimit => "the process's memory limit",
        }
    }
}

/// The memory a generation may use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The budget: device memory on a discrete GPU, process memory otherwise.
    pub bytes: u64,
    /// Where it came from.
    pub source: BudgetSource,
    /// Memory of that pool in use outside the stages' weights and activations, already or soon:
    /// the process's RSS when the budget is a `--max-memory` cap on the CPU; on a GPU, what the
    /// CUDA runtime takes during a first generation (kernel modules, library workspaces).
    pub baseline_bytes: u64,
    /// Host RAM available, on a discrete GPU: for stages moved to the host and for suggesting
    /// `--device cpu`. `None` = unknown (host stages are then assumed to fit).
    pub host_available_bytes: Option<u64>,
    /// All the memory of that kind the machine has (RAM, or the GPU's), for advice that makes
    /// sense here: freeing memory cannot reach more than this. `None` = unknown.
    #[serde(default)]
    pub machine_bytes: Option<u64>,
}

impl Budget {
    /// A budget of `bytes` from `source`, nothing in use, host and machine memory unknown.
    pub fn new(bytes: u64, source: BudgetSource) -> Self {
        Self { bytes, source, baseline_bytes: 0, host_available_bytes: None, machine_bytes: None }
    }
}

/// Everything the planner needs. Build with [`PlanRequest::new`] and adjust the fields.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    /// The family's stages and formulas.
    pub profile: &'a FamilyProfile,
    /// The model's tensors.
    pub manifest: &'a ModelManifest,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Images to generate in all.
    pub n_images: usize,
    /// The most images one batch may hold (`--batch-size`); the planner lowers it where it does
    /// not fit. `None`: all of them.
    pub max_images_per_batch: Option<usize>,
    /// Classifier-free guidance (the denoiser runs every image twice).
    pub guidance: bool,
    /// Image-to-image (the init image is encoded first).
    pub img2img: bool,
    /// The run's precision.
    pub precision: Precision,
    /// The device.
    pub device: DeviceKind,
    /// The memory available.
    pub budget: Budget,
    /// `--memory-mode`.
    pub mode: MemoryMode,
    /// Fraction of the budget kept free, in `[0, 1)`.
    pub safety_margin: f64,
    /// Planner components the engine runs at another precision than the run's, by name (SDXL's
    /// VAE in f32 under half precision: `force_upcast`, for encoding in any half precision and
    /// for decoding in f16).
    pub component_precision: Vec<(String, Precision)>,
    /// The engine's fast kernels run (the default; `--no-fast-kernels` turns them off): the
    /// stages' fast coefficients apply ([`super::ActivationModel::fast_coefficients`]).
    pub fast_kernels: bool,
    /// Stages the run leaves out (an optional encoder that does not run: SD 3.5's T5 with
    /// `--no-t5` or in a folder saved without it); their weights are neither loaded nor counted.
    pub skipped_stages: Vec<String>,
    /// Bytes a component's load holds beyond its weights, by the model folder's component name
    /// (LoRA fusion: the weight being fused in f32 with its delta, one tensor at a time). A
    /// stage's load happens before its activations exist, so this competes with them for the
    /// stage's peak rather than adding to it.
    pub load_transient_bytes: Vec<(String, u64)>,
    /// The denoiser runs tile by tile over the latent (MultiDiffusion: tiles of the model's
    /// native size, one after another): its activations are one tile's batch, not the whole
    /// image's. Sizes in pixels.
    pub denoise_tiling: Option<Tiling>,
    /// Components whose blocks can be streamed (the denoiser's, T5's), with their blocks in
    /// forward order: the planner's last rung before refusing ([`super::stream`]).
    pub streamable: Vec<StreamableBlocks>,
    /// The ways the engine can hold the weights quantised, best image first (empty when the user
    /// chose the weights or the file is quantised already): the rung after streaming
    /// ([`super::quantised`]).
    pub quantised: Vec<QuantisedWeights>,
    /// How the plan's warnings name the request fields their advice changes (`width`,
    /// `max_memory`, `weights`): `generate`'s flags by default ([`flag_name`]); a caller that
    /// shows them to readers who name fields otherwise (a server's JSON fields) passes a function
    /// that writes references it spells later. (A refusal's fields are named when it is
    /// described: [`super::PlanError::describe`].)
    pub field_name: fn(&str) -> String,
}

impl<'a> PlanRequest<'a> {
    /// The batch size asked for: [`Self::max_images_per_batch`] within the images to make.
    pub fn requested_images_per_batch(&self) -> usize {
        self.max_images_per_batch.unwrap_or(self.n_images).clamp(1, self.n_images.max(1))
    }

    /// One guided text-to-image of `width`×`height`, f32 on the CPU, mode auto, default margin.
    pub fn new(
        profile: &'a FamilyProfile,
        manifest: &'a ModelManifest,
        width: usize,
        height: usize,
        budget: Budget,
    ) -> Self {
        Self {
            profile,
            manifest,
            width,
            height,
            n_images: 1,
            max_images_per_batch: None,
            guidance: true,
            img2img: false,
            precision: Precision::F32,
            device: DeviceKind::Cpu,
            budget,
            mode: MemoryMode::Auto,
            safety_margin: DEFAULT_SAFETY_MARGIN,
            component_precision: Vec::new(),
            fast_kernels: true,
            skipped_stages: Vec::new(),
            load_transient_bytes: Vec::new(),
            denoise_tiling: None,
            streamable: Vec::new(),
            quantised: Vec::new(),
            field_name: flag_name,
        }
    }

    /// The budget less the safety margin: what every stage's peak must stay within.
    pub fn usable_bytes(&self) -> u64 {
        (self.budget.bytes as f64 * (1.0 - self.safety_margin)).floor() as u64
    }

    /// The host RAM stages moved to the host may use, less the margin.
    pub fn usable_host_bytes(&self) -> Option<u64> {
        self.budget.host_available_bytes.map(|b| (b as f64 * (1.0 - self.safety_margin)).floor() as u64)
    }
}
