//! The search: per stage, a ladder of option sets from fastest to leanest; per batch size, from
//! all `--n` images at once down to one. Stages run one after another with only their own
//! components resident (sequential residency), so each stage's peak is independent of the
//! others' and the plan fits when every stage does.
//!
//! Preference, fastest first: no options → VAE slicing (free) → attention slicing (largest
//! slice first) → VAE tiling (largest tile first) → fewer images per batch → text encoders
//! streamed on the GPU (T5) → text encoders on the CPU. The last two are independent of the
//! batch (stages of their own), so trying them last for their stage is the same as trying them
//! after smaller batches.
//!
//! Only when no batch size fits resident does the search try block streaming the denoiser
//! ([`super::stream`]): streaming costs reading on every evaluation, smaller batches almost
//! nothing. A text encoder runs once per prompt, so streaming it is tried before the CPU, which
//! is slower still. Only when nothing fits at full precision does [`plan`] try the weights quantised
//! ([`super::quantised`]): that changes the image.

use serde::{Deserialize, Serialize};

use super::activation::{ActivationInputs, BatchRule, KernelFamily};
use super::error::PlanError;
use super::manifest::{ComponentManifest, Precision};
use super::profile::{FamilyProfile, StageSpec, MIN_SCALED_ACTIVATION_BYTES};
use super::quantised::{self, Quantised};
use super::request::{BudgetSource, DeviceKind, MemoryMode, PlanRequest};
use super::stream::{BlockSizes, Streaming};

/// VAE tiling as chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiling {
    /// Tile side in pixels.
    pub tile_px: usize,
    /// Overlap between neighbouring tiles in pixels (blended).
    pub overlap_px: usize,
}

/// The memory options chosen for one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StageOptions {
    /// Attention slicing: at most this many (batch × head) score matrices at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_slice: Option<usize>,
    /// VAE slicing: the batch's images one at a time.
    #[serde(default)]
    pub image_slicing: bool,
    /// VAE tiling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiling: Option<Tiling>,
    /// Run on the host (CPU, f32) instead of the GPU.
    #[serde(default)]
    pub on_host: bool,
    /// Block streaming: the model's blocks beyond the first few read per use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<Streaming>,
}

impl StageOptions {
    /// Whether any chosen option costs speed (VAE slicing does not).
    pub fn is_slower(&self) -> bool {
        self.attention_slice.is_some() || self.tiling.is_some() || self.on_host || self.streaming.is_some()
    }

    /// The one option set of the VAE's two stages (encode, decode) from each one's choice: the
    /// leaner of both, option by option (slicing if either slices, the smaller tile and
    /// attention slice). The engine holds one set of VAE options for its encoder and decoder
    /// (`sdgen::pipeline::stages::vae_options`), so this is what both stages run with: the
    /// planner estimates both with it, and the engine reads it from the plan.
    pub fn vae_shared(self, other: StageOptions) -> StageOptions {
        let smaller = |a: Option<usize>, b: Option<usize>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let tiling = match (self.tiling, other.tiling) {
            (Some(a), Some(b)) => Some(if b.tile_px < a.tile_px { b } else { a }),
            (a, b) => a.or(b),
        };
        StageOptions {
            attention_slice: smaller(self.attention_slice, other.attention_slice),
            image_slicing: self.image_slicing || other.image_slicing,
            tiling,
            ..self
        }
    }

    /// The options in words (`attention slicing (4)`, `VAE tiling (512px, overlap 128px)`).
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.on_host {
            out.push("on CPU".to_string());
        }
        if let Some(s) = self.attention_slice {
            out.push(format!("attention slicing ({s})"));
        }
        if self.image_slicing {
            out.push("VAE slicing".to_string());
        }
        if let Some(t) = self.tiling {
            out.push(format!("VAE tiling ({}px, overlap {}px)", t.tile_px, t.overlap_px));
        }
        if let Some(s) = self.streaming {
            out.push(s.describe());
        }
        out
    }
}

/// Where a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// On the run's device.
    Device,
    /// On the host (CPU) while the device is a GPU.
    Host,
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// The stage (`text_encoder`, `denoise`, `decode`, `encode_image`).
    pub stage: String,
    /// Components resident during it.
    pub components: Vec<String>,
    /// Where it runs.
    pub placement: Placement,
    /// Its precision.
    pub precision: Precision,
    /// Items per forward (images × 2 with guidance for the denoiser; 1 with VAE slicing).
    pub items_per_forward: usize,
    /// Weights resident, at the precision they run in.
    pub weight_bytes: u64,
    /// Estimated activation peak.
    pub activation_bytes: u64,
    /// `baseline + weights + activations` (no baseline on the host).
    pub peak_bytes: u64,
    /// Options chosen.
    pub options: StageOptions,
    /// The denoiser's MultiDiffusion tiles, when the pass runs tile by tile
    /// ([`PlanRequest::denoise_tiling`]): not an option the planner chooses, the pass's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoise_tiles: Option<Tiling>,
    /// Whether the peak is within the usable budget (of the host when placed there).
    pub fits: bool,
}

/// The planner's verdict; the one rule behind both the refusal and the warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The fastest plan fits: no option that costs speed is needed.
    Fits,
    /// It fits only with options that cost speed (attention slicing, VAE tiling, fewer images
    /// per batch, encoders on the CPU): a warning.
    FitsWithSlowerOptions,
    /// Nothing fits: an error before anything is loaded.
    DoesNotFit,
}

/// A memory plan: what is resident when, with which options, how many images per batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The family's display name.
    pub family: String,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Images to generate.
    pub n_images: usize,
    /// Images per batch (the rest run in further batches, with cleanup between; the last batch
    /// may hold fewer).
    pub images_per_batch: usize,
    /// The batch size asked for (`--batch-size`, or all the images); `images_per_batch` is lower
    /// where that did not fit.
    #[serde(default)]
    pub requested_images_per_batch: usize,
    /// Number of batches.
    pub batch_count: usize,
    /// Classifier-free guidance.
    pub guidance: bool,
    /// Image-to-image.
    pub img2img: bool,
    /// The run's precision.
    pub precision: Precision,
    /// The device.
    pub device: DeviceKind,
    /// The memory mode asked for.
    pub mode: MemoryMode,
    /// The budget.
    pub budget_bytes: u64,
    /// Where the budget came from.
    pub budget_source: BudgetSource,
    /// The budget less the safety margin.
    pub usable_bytes: u64,
    /// The safety margin (fraction of the budget).
    pub safety_margin: f64,
    /// Memory of the budget's pool already in use.
    pub baseline_bytes: u64,
    /// The stages, in order.
    pub stages: Vec<StagePlan>,
    /// Highest peak of the stages on the device.
    pub peak_bytes: u64,
    /// The verdict.
    pub verdict: Verdict,
    /// The weights held quantised by the planner's last rung (none when the weights are as
    /// stored or as `--weights` chose them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantised: Option<Quantised>,
    /// The warning to print and record when the verdict is
    /// [`FitsWithSlowerOptions`](Verdict::FitsWithSlowerOptions) (not in low mode, which asks
    /// for slower options).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl Plan {
    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.stage == name)
    }

    /// The optimisations in the metadata's words (the seed's `memory_optimizations` list:
    /// `attention_slicing`, `vae_slicing`, plus `vae_tiling`, `text_encoder_on_cpu`,
    /// `batch_splitting`).
    pub fn memory_optimizations(&self) -> Vec<&'static str> {
        let any = |f: fn(&StageOptions) -> bool| self.stages.iter().any(|s| f(&s.options));
        let mut out = Vec::new();
        if any(|o| o.attention_slice.is_some()) {
            out.push("attention_slicing");
        }
        if any(|o| o.image_slicing) {
            out.push("vae_slicing");
        }
        if any(|o| o.tiling.is_some()) {
            out.push("vae_tiling");
        }
        if any(|o| o.on_host) {
            out.push("text_encoder_on_cpu");
        }
        if any(|o| o.streaming.is_some()) {
            out.push("block_streaming");
        }
        if self.quantised.is_some() {
            out.push("quantised_weights");
        }
        if self.batch_split() {
            out.push("batch_splitting");
        }
        out
    }

    /// The options that cost speed, in words, with the batch split first.
    pub fn slower_options(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(q) = &self.quantised {
            out.push(format!("weights quantised to {}", q.weights));
        }
        if self.batch_split() {
            out.push(format!("{} batches of {}", self.batch_count, self.images_per_batch));
        }
        for s in &self.stages {
            let o = &s.options;
            if o.on_host {
                out.push(format!("{} on CPU", s.stage));
            }
            if let Some(n) = o.attention_slice {
                out.push(format!("attention slicing ({n})"));
            }
            if let Some(st) = o.streaming {
                out.push(format!("{} streamed ({} of {} blocks resident)", s.stage, st.resident_blocks, st.blocks));
            }
            if let Some(t) = o.tiling {
                out.push(format!(
                    "{} tiling ({}px)",
                    if s.stage == "decode" { "VAE" } else { s.stage.as_str() },
                    t.tile_px
                ));
            }
        }
        out
    }

    pub(crate) fn is_slower(&self) -> bool {
        self.batch_split() || self.quantised.is_some() || self.stages.iter().any(|s| s.options.is_slower())
    }

    /// Whether memory made the run take more batches than the batch size asked for needs (not
    /// the balancing of the same number of batches).
    pub fn batch_split(&self) -> bool {
        self.batch_count > self.n_images.div_ceil(self.requested_images_per_batch.max(1))
    }
}

/// Plans a generation: the fastest plan that fits under the request's mode at full precision,
/// else with the weights quantised ([`PlanRequest::quantised`]: the first kind that fits, the
/// leanest in low mode), or [`PlanError::DoesNotFit`] with the numbers and what would help (for
/// the leanest quantised weights where there are any). Pure: reads nothing.
pub fn plan(request: &PlanRequest) -> Result<Plan, PlanError> {
    let stored = plan_as_held(request);
    let Err(PlanError::DoesNotFit { .. }) = &stored else { return stored };
    // Fast mode takes nothing that costs speed: dequantising does (on the CPU).
    if request.mode == MemoryMode::Fast {
        return stored;
    }
    let as_held = |q: &quantised::QuantisedWeights| {
        let r = PlanRequest { manifest: &q.manifest, quantised: Vec::new(), ..request.clone() };
        let weights: u64 = q.manifest.components.iter().map(quantised::quantised_weights).sum();
        let choice = Quantised::new(q.kind, request.device, weights);
        plan_as_held(&r).map(|mut p| {
            let other = p.warning.take();
            p.warning = Some(quantised_warning(&p, &choice, other, request.field_name));
            p.quantised = Some(choice.clone());
            p
        })
    };
    // Best image first; low mode: the leanest weights first.
    let weight_bytes = |q: &&quantised::QuantisedWeights| -> u64 {
        q.manifest.components.iter().map(|c| c.bytes_at(&[], request.precision)).sum()
    };
    let mut order: Vec<&quantised::QuantisedWeights> = request.quantised.iter().collect();
    if request.mode == MemoryMode::Low {
        order.sort_by_key(weight_bytes);
    }
    if let Some(p) = order.iter().find_map(|q| as_held(q).ok()) {
        return Ok(p);
    }
    // The refusal names what the leanest weights would need.
    let leanest = request.quantised.iter().min_by_key(weight_bytes);
    match leanest.map(as_held) {
        Some(Err(PlanError::DoesNotFit { stage, need_bytes, budget_bytes, usable_bytes, suggestions, mut plan })) => {
            plan.quantised = leanest.map(|q| Quantised::new(q.kind, request.device, 0));
            Err(PlanError::DoesNotFit { stage, need_bytes, budget_bytes, usable_bytes, suggestions, plan })
        }
        _ => stored,
    }
}

/// The warning of a plan whose weights the planner quantised (before any other it has), the
/// fields it names as `name` spells them ([`PlanRequest::field_name`]).
fn quantised_warning(plan: &Plan, choice: &Quantised, other: Option<String>, name: fn(&str) -> String) -> String {
    let text = format!(
        "⚠️  WARNING: {} at {}×{} does not fit in {} usable at full precision: its weights are quantised to {} ({}), which changes the image; pass {} to choose, or more {}",
        plan.family,
        plan.width,
        plan.height,
        super::table::format_bytes(plan.usable_bytes),
        choice.weights,
        choice.quality,
        name("weights"),
        name("max_memory")
    );
    match other {
        Some(o) => format!("{text}\n{o}"),
        None => text,
    }
}

/// [`plan`] with the weights as the manifest holds them.
fn plan_as_held(request: &PlanRequest) -> Result<Plan, PlanError> {
    let ctx = Ctx::new(request)?;
    let auto = ctx.best(MemoryMode::Balanced);
    let chosen = match request.mode {
        MemoryMode::Auto | MemoryMode::Balanced => auto.clone(),
        MemoryMode::Fast => ctx.best(MemoryMode::Fast),
        MemoryMode::Low => Some(ctx.leanest(Ladder::Streamed)).filter(|p| p.stages.iter().all(|s| s.fits)),
    };
    match chosen {
        Some(mut plan) => {
            // Low mode chooses slower options on purpose: its verdict is the fastest plan's.
            let reference = if request.mode == MemoryMode::Low { auto.as_ref().unwrap_or(&plan) } else { &plan };
            plan.verdict = if reference.is_slower() { Verdict::FitsWithSlowerOptions } else { Verdict::Fits };
            plan.warning = super::advice::warning(&ctx, &plan);
            Ok(plan)
        }
        None => Err(super::advice::does_not_fit(&ctx, auto.as_ref())),
    }
}

/// Which options a search may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ladder {
    /// Only free options (VAE slicing) and batch splitting: `--memory-mode fast`.
    Free,
    /// Every resident option.
    Full,
    /// Every option, block streaming too.
    Streamed,
}

impl Ladder {
    /// The ladder a mode searches last (its leanest plans).
    pub(crate) fn of(mode: MemoryMode) -> Self {
        if mode == MemoryMode::Fast {
            Ladder::Free
        } else {
            Ladder::Streamed
        }
    }
}

/// A request with its stages resolved (weights summed, options enumerated).
pub(crate) struct Ctx<'r, 'a> {
    pub(crate) req: &'r PlanRequest<'a>,
    stages: Vec<StageCtx<'a>>,
}

struct StageCtx<'a> {
    spec: &'a StageSpec,
    /// Precision on the device (the component's own when it overrides the run's).
    precision: Precision,
    weight_bytes_device: u64,
    /// Weights when run on the host, in f32.
    weight_bytes_host: u64,
    /// The model's width against the standard one its coefficients were measured on.
    width_ratio: f64,
    /// The most its components' loads hold beyond their weights ([`PlanRequest::load_transient_bytes`]).
    load_transient_bytes: u64,
    /// Its model's streamable blocks ([`PlanRequest::streamable`]), if any.
    blocks: Option<BlockSizes>,
    /// The most a product holds while it dequantises a quantised weight (on the device).
    dequantise_bytes: u64,
}

/// `spec`'s width ratio ([`StageWidth`]) in `components`' tensors: 1 when it has none or the
/// tensor is not found.
fn width_ratio(spec: &StageSpec, components: &[&ComponentManifest]) -> f64 {
    let Some(w) = &spec.width else { return 1.0 };
    let found = w
        .tensors
        .iter()
        .find_map(|suffix| components.iter().flat_map(|c| c.tensors.iter()).find(|t| t.name.ends_with(suffix)));
    match found.and_then(|t| t.shape.get(w.axis)) {
        Some(&d) if d > 0 && w.standard > 0 => d as f64 / w.standard as f64,
        _ => 1.0,
    }
}

impl<'r, 'a> Ctx<'r, 'a> {
    pub(crate) fn new(req: &'r PlanRequest<'a>) -> Result<Self, PlanError> {
        validate(req)?;
        let profile: &'a FamilyProfile = req.profile;
        let mut stages = Vec::new();
        let runs = |s: &&StageSpec| (req.img2img || !s.img2img_only) && !req.skipped_stages.iter().any(|k| k == s.name);
        for spec in profile.stages.iter().filter(runs) {
            let mut precision = None;
            let (mut device, mut host) = (0u64, 0u64);
            let mut manifests = Vec::new();
            let mut load_transient_bytes = 0;
            let mut blocks = None;
            for &name in &spec.components {
                let comp = profile.component(name).ok_or_else(|| {
                    PlanError::InvalidRequest(format!(
                        "family profile {} names component `{name}` in stage {} but does not define it",
                        profile.name, spec.name
                    ))
                })?;
                let manifest = req.manifest.component(comp.source);
                // The first prefix names the component's own tensors (`encoder.`): a VAE file
                // without them cannot encode, whatever else it has.
                let main = &comp.prefixes[..comp.prefixes.len().min(1)];
                let Some(manifest) = manifest.filter(|m| m.select(main).next().is_some()) else {
                    return Err(PlanError::MissingComponent {
                        component: name.to_string(),
                        source: comp.source.to_string(),
                        stage: spec.name.to_string(),
                    });
                };
                let forced = req.component_precision.iter().find(|(c, _)| c == name).map(|(_, p)| *p);
                // A stage streams its one streamable component's blocks.
                let streamable = req.streamable.iter().find(|s| s.component == comp.source && comp.prefixes.is_empty());
                blocks = blocks.or_else(|| {
                    streamable.and_then(|s| BlockSizes::of(manifest, &s.blocks, forced.unwrap_or(req.precision)))
                });
                precision = precision.or(forced).or(manifest.precision);
                device += manifest.bytes_at(comp.prefixes, forced.unwrap_or(req.precision));
                host += manifest.select(comp.prefixes).map(|t| t.bytes_at(Precision::F32)).sum::<u64>();
                manifests.push(manifest);
                // Components load one after another: the largest transient counts.
                let transient = req.load_transient_bytes.iter().filter(|(c, _)| c == comp.source).map(|(_, b)| *b);
                load_transient_bytes = transient.fold(load_transient_bytes, u64::max);
            }
            let precision = precision.unwrap_or(req.precision);
            stages.push(StageCtx {
                spec,
                precision,
                dequantise_bytes: quantised::transient_bytes(&manifests, precision, req.device),
                weight_bytes_device: device,
                weight_bytes_host: host,
                width_ratio: width_ratio(spec, &manifests),
                load_transient_bytes,
                blocks,
            });
        }
        Ok(Self { req, stages })
    }

    /// The fastest plan `mode` allows: resident if any batch size fits so, else streamed (fast
    /// mode never streams).
    pub(crate) fn best(&self, mode: MemoryMode) -> Option<Plan> {
        match mode {
            MemoryMode::Fast => self.search(Ladder::Free),
            _ => self.search(Ladder::Full).or_else(|| self.search(Ladder::Streamed)),
        }
    }

    /// The fastest plan that fits: for each batch size from the one asked for down, the first
    /// fitting option set of every stage's ladder. Only balanced sizes are tried (10 images
    /// within 7 a batch run as 5 + 5, not 7 + 3): the same number of batches, each smaller.
    pub(crate) fn search(&self, ladder: Ladder) -> Option<Plan> {
        let n = self.req.n_images;
        let balanced = |per_batch: usize| n.div_ceil(n.div_ceil(per_batch)) == per_batch;
        for per_batch in (1..=self.req.requested_images_per_batch()).rev().filter(|&p| balanced(p)) {
            let mut chosen = Vec::with_capacity(self.stages.len());
            for stage in &self.stages {
                match self.ladder(stage, per_batch, ladder).into_iter().find(|c| c.fits) {
                    Some(c) => chosen.push(c),
                    None => break,
                }
            }
            if chosen.len() == self.stages.len() {
                // Shared options (the encoders' host, the VAE's) may not fit where a stage's own did.
                let plan = self.assemble(per_batch, chosen);
                if plan.verdict != Verdict::DoesNotFit {
                    return Some(plan);
                }
            }
        }
        None
    }

    /// The leanest plan, fitting or not: one image per batch, each stage's smallest device peak
    /// (ties to the faster option).
    pub(crate) fn leanest(&self, ladder: Ladder) -> Plan {
        let chosen = self
            .stages
            .iter()
            .map(|stage| {
                self.ladder(stage, 1, ladder)
                    .into_iter()
                    .min_by_key(|c| (!c.fits, c.device_bytes()))
                    .expect("every ladder starts with the no-option set")
            })
            .collect();
        self.assemble(1, chosen)
    }

    /// The highest stage peak with no options and the batch size asked for.
    pub(crate) fn fastest_peak_bytes(&self) -> u64 {
        let n = self.req.requested_images_per_batch();
        self.stages.iter().map(|s| self.estimate(s, n, StageOptions::default()).device_bytes()).max().unwrap_or(0)
    }

    /// The option sets of a stage, fastest first, each estimated.
    fn ladder(&self, stage: &StageCtx, per_batch: usize, ladder: Ladder) -> Vec<StagePlan> {
        let spec = &stage.spec.options;
        let items_unsliced = self.items(stage, per_batch, false);
        let mut sets = vec![StageOptions::default()];
        let slicing = spec.image_slicing && items_unsliced > 1;
        if slicing {
            sets.push(StageOptions { image_slicing: true, ..Default::default() });
        }
        if ladder != Ladder::Free {
            let base = StageOptions { image_slicing: slicing, ..Default::default() };
            if let (true, Some(att)) = (spec.attention_slicing, &stage.spec.activation.attention) {
                // Halving from half the score matrices down to one at a time (diffusers'
                // "auto" is half the heads, "max" one).
                let mut slice = (items_unsliced * att.heads) / 2;
                while slice >= 1 {
                    sets.push(StageOptions { attention_slice: Some(slice), ..base });
                    slice /= 2;
                }
            }
            if let Some(tiling) = &spec.tiling {
                for &tile in &tiling.tile_px {
                    if tile < self.req.width || tile < self.req.height {
                        let overlap_px = (tile as f64 * tiling.overlap).round() as usize;
                        sets.push(StageOptions { tiling: Some(Tiling { tile_px: tile, overlap_px }), ..base });
                    }
                }
            }
        }
        let host = ladder != Ladder::Free && spec.host_offload && self.req.device == DeviceKind::DiscreteGpu;
        let mut plans: Vec<StagePlan> = sets.iter().map(|&o| self.estimate(stage, per_batch, o)).collect();
        // The streaming rung: each device option set again, with as many blocks resident as fit,
        // then with every block streamed (the leanest: any resident block adds to the peak at
        // least what it saves from the largest streamed one). A stage the CPU could take instead
        // (a text encoder) streams before it goes there, in either ladder: it runs once per
        // prompt, so streaming costs one read of its weights (T5-XXL: ~0.4 s over PCIe), where
        // the CPU runs it in f32 (12.5 s on 16 cores, BENCHMARKS.md session 9) from twice the
        // host memory.
        let streams = ladder == Ladder::Streamed || host;
        if let (true, Some(blocks)) = (streams, &stage.blocks) {
            for &o in &sets {
                let with = |k: usize| {
                    let (_, _, streaming) = blocks.split(k, self.req.device);
                    self.estimate(stage, per_batch, StageOptions { streaming: Some(streaming), ..o })
                };
                // Keeping every block resident is the resident plan, not this rung.
                if let Some(most) = (1..blocks.count()).rev().map(with).find(|p| p.fits) {
                    plans.push(most);
                }
                plans.push(with(0));
            }
        }
        if host {
            plans.push(self.on_host(stage, per_batch));
        }
        plans
    }

    /// The stage on the host (a text encoder on the CPU, in f32).
    fn on_host(&self, stage: &StageCtx, per_batch: usize) -> StagePlan {
        self.estimate(stage, per_batch, StageOptions { on_host: true, ..Default::default() })
    }

    fn items(&self, stage: &StageCtx, per_batch: usize, image_slicing: bool) -> usize {
        match stage.spec.activation.batch {
            BatchRule::OnePrompt => 1,
            BatchRule::GuidedImages => per_batch * if self.req.guidance { 2 } else { 1 },
            BatchRule::Images if image_slicing => 1,
            BatchRule::Images => per_batch,
        }
    }

    fn estimate(&self, stage: &StageCtx, per_batch: usize, options: StageOptions) -> StagePlan {
        let req = self.req;
        let items = self.items(stage, per_batch, options.image_slicing);
        let (kernels, precision, mut weight_bytes, baseline) = if options.on_host {
            (KernelFamily::Cpu, Precision::F32, stage.weight_bytes_host, 0)
        } else {
            (req.device.kernels(), stage.precision, stage.weight_bytes_device, req.budget.baseline_bytes)
        };
        // Streamed: the blocks past the resident ones leave the weights; those in flight come back.
        let mut host_bytes = 0;
        if let (Some(s), Some(blocks)) = (options.streaming, &stage.blocks) {
            let (streamed, in_flight, _) = blocks.split(s.resident_blocks, req.device);
            weight_bytes = weight_bytes - streamed + in_flight;
            // A discrete GPU's streamed blocks wait in host memory.
            if req.device == DeviceKind::DiscreteGpu {
                host_bytes = streamed;
            }
        }
        // A tiled denoiser's forward takes one tile (of the guided batch) at a time.
        let denoise_tiles = req.denoise_tiling.filter(|_| stage.spec.activation.batch == BatchRule::GuidedImages);
        let inputs = ActivationInputs {
            width: req.width,
            height: req.height,
            items,
            images: per_batch,
            attention_slice: options.attention_slice,
            tile_px: options.tiling.or(denoise_tiles).map(|t| (t.tile_px, t.tile_px)),
            max_score_elements: Some(kernels.max_score_elements()),
            max_column_elements: Some(kernels.max_column_elements()),
        };
        let standard = stage.spec.activation.bytes(kernels, precision, req.fast_kernels, &inputs);
        let activation_bytes = if stage.width_ratio < 1.0 {
            ((standard as f64 * stage.width_ratio).ceil() as u64).max(MIN_SCALED_ACTIVATION_BYTES)
        } else {
            (standard as f64 * stage.width_ratio).ceil() as u64
        };
        // The load's transient (a LoRA fused as its weight loads) is gone before the first
        // activation exists, except where blocks are streamed: a streamed block is loaded, and
        // fused, again on every use, beside the activations. A dequantised weight lives beside
        // them while its product runs.
        let dequantise = if options.on_host { 0 } else { stage.dequantise_bytes };
        let during = if options.streaming.is_some() { stage.load_transient_bytes } else { 0 };
        let peak_bytes =
            baseline + weight_bytes + (activation_bytes + dequantise + during).max(stage.load_transient_bytes);
        let fits = if options.on_host {
            req.usable_host_bytes().is_none_or(|h| peak_bytes <= h)
        } else {
            peak_bytes <= req.usable_bytes() && req.usable_host_bytes().is_none_or(|h| host_bytes <= h)
        };
        StagePlan {
            stage: stage.spec.name.to_string(),
            components: stage.spec.components.iter().map(|c| c.to_string()).collect(),
            placement: if options.on_host { Placement::Host } else { Placement::Device },
            precision,
            items_per_forward: items,
            weight_bytes,
            activation_bytes,
            peak_bytes,
            options,
            denoise_tiles,
            fits,
        }
    }

    /// The VAE's stages (encode, decode) re-estimated with their one option set
    /// ([`StageOptions::vae_shared`]): a stage whose own choice was faster runs the other's
    /// leaner options all the same (a 4096² image-to-image pass whose f32 encoder must tile
    /// decodes in the same tiles), and the plan must say so.
    fn share_vae_options(&self, per_batch: usize, mut stages: Vec<StagePlan>) -> Vec<StagePlan> {
        let vae: Vec<usize> = (0..self.stages.len()).filter(|&i| self.stages[i].spec.options.is_vae()).collect();
        let Some(shared) = vae.iter().map(|&i| stages[i].options).reduce(StageOptions::vae_shared) else {
            return stages;
        };
        for i in vae {
            if stages[i].options != shared {
                stages[i] = self.estimate(&self.stages[i], per_batch, shared);
            }
        }
        stages
    }

    /// The text encoders' placement on the host, shared: the run has one switch for them all
    /// (`text_encoder_on_host`), which moves every encoder it does not stream on the device, so
    /// one encoder on the host takes those others there, and the plan must say so and count
    /// their host memory.
    fn share_host_placement(&self, per_batch: usize, mut stages: Vec<StagePlan>) -> Vec<StagePlan> {
        if !stages.iter().any(|s| s.options.on_host) {
            return stages;
        }
        for (i, stage) in self.stages.iter().enumerate() {
            let o = stages[i].options;
            if stage.spec.options.host_offload && !o.on_host && o.streaming.is_none() {
                stages[i] = self.on_host(stage, per_batch);
            }
        }
        stages
    }

    fn assemble(&self, per_batch: usize, stages: Vec<StagePlan>) -> Plan {
        let req = self.req;
        let stages = self.share_host_placement(per_batch, stages);
        let stages = self.share_vae_options(per_batch, stages);
        let fits = stages.iter().all(|s| s.fits);
        Plan {
            family: req.profile.name.to_string(),
            width: req.width,
            height: req.height,
            n_images: req.n_images,
            images_per_batch: per_batch,
            requested_images_per_batch: req.requested_images_per_batch(),
            batch_count: req.n_images.div_ceil(per_batch),
            guidance: req.guidance,
            img2img: req.img2img,
            precision: req.precision,
            device: req.device,
            mode: req.mode,
            budget_bytes: req.budget.bytes,
            budget_source: req.budget.source,
            usable_bytes: req.usable_bytes(),
            safety_margin: req.safety_margin,
            baseline_bytes: req.budget.baseline_bytes,
            peak_bytes: stages.iter().map(StagePlan::device_bytes).max().unwrap_or(0),
            stages,
            verdict: if fits { Verdict::Fits } else { Verdict::DoesNotFit },
            quantised: None,
            warning: None,
        }
    }
}

impl StagePlan {
    /// Bytes this stage needs of the budget's pool (0 when it runs on the host of a GPU).
    pub fn device_bytes(&self) -> u64 {
        if self.placement == Placement::Host {
            0
        } else {
            self.peak_bytes
        }
    }
}

fn validate(req: &PlanRequest) -> Result<(), PlanError> {
    let m = req.profile.size_multiple.max(1);
    let bad = |what: String| Err(PlanError::InvalidRequest(what));
    if req.n_images == 0 {
        return bad("--n 0: at least one image is needed".into());
    }
    for (flag, v) in [("--width", req.width), ("--height", req.height)] {
        if v == 0 || v % m != 0 {
            return bad(format!("{flag} {v} is not a positive multiple of {m}, as {} needs", req.profile.name));
        }
    }
    if !(0.0..1.0).contains(&req.safety_margin) {
        return bad(format!("safety margin {} is not a fraction in [0, 1)", req.safety_margin));
    }
    if req.budget.bytes == 0 {
        return bad(format!("the memory budget ({}) is 0 bytes", req.budget.source.label()));
    }
    Ok(())
}
