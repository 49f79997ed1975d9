//! The memory planner: a pure function from a model's tensor manifest (names, shapes, dtypes
//! from the safetensors headers), the resolution, the number of images, the precision, the
//! device and the memory available (or `--max-memory`) to a [`Plan`]: what is resident when,
//! which memory options each stage uses, and how many of the `--n` images run per batch. It
//! reads nothing and loads nothing, so a request that cannot fit is refused before any weight
//! is read, with the numbers and what would help ([`PlanError::DoesNotFit`]).
//!
//! - Weights are exact: the manifest's element counts at the precision the run converts them to.
//! - Activations are estimated per stage by a small formula with named coefficients
//!   ([`ActivationModel`]), derived from the architecture and fitted to measurements
//!   ([`fit_coefficients`]).
//! - Families are data ([`FamilyProfile`]: components, stages, formulas, options), so SDXL and
//!   SD 3.5 plug in as new profiles, not new planner code.
//! - After streaming, the weights held quantised ([`QuantisedWeights`], what `--weights` loads),
//!   best image first, only when nothing at full precision fits ([`quantised`]'s module doc).
//! - One rule ([`Verdict`]) decides both the refusal ("does not fit": an error before loading)
//!   and the warning ("fits only with slower options", [`Plan::warning`]).
//! - A long-lived engine's warm weights (kept loaded between jobs) do not change a plan: the
//!   budget counts them as free, and [`evictions`] says which must go for every stage to fit
//!   beside the rest ([`StageResidency`]).
//! - `--memory-mode` is [`MemoryMode`] (`FromStr`), `--max-memory` is [`parse_memory_size`]
//!   (binary units: "GB" is GiB, as the console prints it).
//!
//! For the engine: fill a [`ComponentManifest`] per model-folder component from its safetensors
//! headers ([`StoredDType::from_safetensors`] on each tensor's dtype), pick the profile
//! ([`FamilyProfile::for_family`]), the budget (free GPU memory, available RAM, or
//! `--max-memory`) and call [`plan`]; print the plan ([`Plan`]'s `Display`), record it (it is
//! `Serialize`), print [`Plan::warning`] if any, and run each stage with its [`StageOptions`]
//! and [`Plan::images_per_batch`].
//!
//! ```
//! use sdgen_memory::plan::{plan, Budget, BudgetSource, ComponentManifest, FamilyProfile, ModelManifest,
//!     PlanRequest, StoredDType, TensorEntry};
//!
//! let profile = FamilyProfile::sd15();
//! // The engine fills this from the safetensors headers; one tensor per component here.
//! let manifest = ModelManifest::new(vec![
//!     ComponentManifest::new("text_encoder", vec![TensorEntry::new("w", vec![123_060_480], StoredDType::F32)]),
//!     ComponentManifest::new("unet", vec![TensorEntry::new("w", vec![859_520_964], StoredDType::F32)]),
//!     ComponentManifest::new("vae", vec![
//!         TensorEntry::new("decoder.w", vec![49_490_199], StoredDType::F32),
//!         TensorEntry::new("encoder.w", vec![34_163_592], StoredDType::F32),
//!     ]),
//! ]);
//! let budget = Budget::new(8 << 30, BudgetSource::MaxMemory);
//! let plan = plan(&PlanRequest::new(&profile, &manifest, 512, 512, budget)).unwrap();
//! println!("{plan}");
//! ```

mod activation;
mod advice;
mod error;
mod fit;
mod manifest;
mod planner;
mod profile;
mod quantised;
mod request;
mod resident;
mod size;
mod stream;
mod table;

pub use activation::{
    ActivationInputs, ActivationModel, AttentionShape, BatchRule, CoefficientTable, Coefficients, FastCoefficients,
    Features, KernelFamily, ENGINE_MAX_CONV_COLUMN_ELEMENTS, ENGINE_MAX_CONV_COLUMN_ELEMENTS_GPU,
    ENGINE_MAX_SCORE_ELEMENTS, ENGINE_MAX_SCORE_ELEMENTS_GPU,
};
pub use error::{flag_name, Fix, PlanError, Suggestion};
pub use fit::{fit_coefficients, fit_scale, relative_errors, FitError, Measurement, Term};
pub use manifest::{Blocks, ComponentManifest, ModelManifest, Precision, StoredDType, TensorEntry};
pub use planner::{plan, Placement, Plan, StageOptions, StagePlan, Tiling, Verdict};
pub use profile::{
    ComponentSpec, FamilyProfile, StageOptionsSpec, StageSpec, StageWidth, TilingSpec, MIN_SCALED_ACTIVATION_BYTES,
};
pub use quantised::{Quantised, QuantisedKind, QuantisedWeights, QUANTISED_KINDS};
pub use request::{Budget, BudgetSource, DeviceKind, MemoryMode, PlanRequest, DEFAULT_SAFETY_MARGIN};
pub use resident::{evictions, fits_with, StageResidency};
pub use size::{parse_memory_size, ParseSizeError};
pub use stream::{
    blocks_in_flight, is_resident_block, stream_bandwidth, StreamBandwidth, StreamableBlocks, Streaming,
    STREAM_BANDWIDTH,
};
pub use table::format_bytes;
