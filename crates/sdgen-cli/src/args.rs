//! The command line: raw arguments (clap) are validated and resolved once into what the engine
//! takes.

use std::path::PathBuf;

use clap::Parser;
use sdgen::candle::DType;
use sdgen::engine::{
    EngineConfig, GenerateRequest, Img2ImgInput, LoraRequest, RefinerRequest, UpscaleRequest, MAX_IMAGES,
};
use sdgen::hub::HubOptions;
use sdgen::loading::{ModelSource, OpenOptions, DEFAULT_MODEL, PRO_MODEL};
use sdgen::output::OutputTarget;
use sdgen::pipeline::{check_strength, FamilyOptions, InitImage, Request, Runtime, SkipLayerGuidance};
use sdgen::presets::Preset;
use sdgen::schedulers::SchedulerKind;

/// Generate images from a text prompt with Stable Diffusion.
#[derive(Debug, Parser)]
#[command(name = "generate", version, about)]
pub struct Args {
    /// What to draw; `-` reads prompts from standard input, one per line.
    pub prompt: Option<String>,
    /// What to draw (as -p/--prompt, stable-diffusion.cpp's spelling; instead of the positional).
    #[arg(short = 'p', long = "prompt", value_name = "TEXT", conflicts_with = "prompt")]
    pub prompt_flag: Option<String>,
    /// Prompts from a file, one per line (blank lines skipped): each line a job with every other
    /// setting, the seeds continuing from one job's images to the next.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "prompt_flag"])]
    pub prompt_file: Option<PathBuf>,
    /// A named model (sdxl, sdxl-refiner, sdxl-turbo, sd15, sd15-lcm, sd35-large,
    /// sd35-large-turbo, sd35-medium; see --list-models), a hub repo id (org/name), a diffusers model folder or a single-file
    /// .safetensors checkpoint [default: sdxl].
    #[arg(short = 'm', long)]
    pub model: Option<String>,
    /// Professional quality: Stable Diffusion 3.5 Large (as --model sd35-large) at its defaults,
    /// 1024², 28 steps, guidance 3.5; every other flag still applies.
    #[arg(long, conflicts_with = "model")]
    pub pro: bool,
    /// SD 3.5: run without the T5 encoder (its ~9.5 GB of weights never load; the prompt is read
    /// by the two CLIP encoders only, a little less faithfully).
    #[arg(long)]
    pub no_t5: bool,
    /// SD 3.5: tokens the T5 encoder reads of each prompt, up to 512 [default: 256].
    #[arg(long, value_name = "TOKENS", value_parser = count, allow_negative_numbers = true)]
    pub max_sequence_length: Option<usize>,
    /// SD 3.5: skip-layer guidance over these transformer blocks (Stability recommends 7,8,9 for
    /// 3.5 Medium), from 1% to 20% of the steps.
    #[arg(long, value_name = "LAYERS", value_delimiter = ',')]
    pub slg: Option<Vec<usize>>,
    /// With --slg: its scale [default: 2.8].
    #[arg(long, value_name = "SCALE", requires = "slg", allow_negative_numbers = true)]
    pub slg_scale: Option<f64>,
    /// Finish SDXL and SD 3.5 runs with this refiner (a named model, hub repo or folder, e.g.
    /// stabilityai/stable-diffusion-xl-refiner-1.0 or sdxl-refiner). After SDXL, the base denoises
    /// the first part of the schedule, is unloaded, and the refiner finishes it from its latents
    /// (diffusers' ensemble of experts; --refiner-start). After SD 3.5, whose latents the refiner
    /// cannot read, the base runs all its steps and decodes, the whole SD 3.5 pipeline is
    /// unloaded, and the refiner encodes the image with its own VAE and reworks it by
    /// image-to-image (--refiner-strength).
    #[arg(long, value_name = "MODEL")]
    pub refiner: Option<String>,
    /// A LoRA fused into the model's UNet and text encoders (SD 1.5 and SDXL): a .safetensors file
    /// in kohya/A1111 or diffusers/PEFT keys, or a hub repo holding one, with its scale after a
    /// colon (style.safetensors:0.8) [default scale: 1]. Repeat for several; each is checked
    /// against the model before anything loads, and recorded as <lora:name:scale>.
    #[arg(long, value_name = "PATH|REPO[:SCALE]")]
    pub lora: Vec<String>,
    /// With --refiner after SDXL: the fraction of the steps the base runs before handing its
    /// latents over [default: 0.8].
    #[arg(long, value_name = "FRACTION")]
    pub refiner_start: Option<f64>,
    /// With --refiner after SD 3.5: how much of the finished image the refiner reworks, from 0
    /// (keep) to 1 (replace): it re-noises the image to that level and runs the last
    /// strength × steps of its steps [default: the refiner's image-to-image default, 0.3 as
    /// diffusers' StableDiffusionXLImg2ImgPipeline]. A strength rather than --refiner-start:
    /// there is no shared schedule to hand over in, and 0.3 is the documented refine of a
    /// finished image. The refiner runs --steps, --guidance and --scheduler where given, else its
    /// own defaults (50 steps, guidance 5).
    #[arg(long, value_name = "STRENGTH", allow_negative_numbers = true)]
    pub refiner_strength: Option<f64>,
    /// Use this VAE instead of the model's own (a hub repo or a diffusers VAE folder, e.g.
    /// madebyollin/sdxl-vae-fp16-fix).
    #[arg(long, value_name = "REPO|PATH")]
    pub vae: Option<String>,
    /// What not to draw.
    #[arg(long)]
    pub negative: Option<String>,
    /// How prompts are read: `a1111` (the default) reads A1111's `(word:1.2)`, `(word)`,
    /// `[word]`, `\(` and `BREAK`, and encodes prompts over 75 tokens in chunks of 75 (a plain
    /// prompt that fits is encoded exactly as diffusers does); `diffusers` reads brackets as text
    /// and cuts at 77 tokens, with a warning naming what was cut.
    #[arg(long, value_name = "STYLE", default_value = "a1111", value_parser = ["a1111", "diffusers"])]
    pub prompt_style: String,
    /// A1111's "Clip skip" for SD 1.5: 1 = the text encoder's last layer (the default), 2 = the
    /// one before (then its final layer norm), and so on.
    #[arg(long, value_name = "N", value_parser = count, allow_negative_numbers = true)]
    pub clip_skip: Option<usize>,
    /// Number of batches (A1111's batch count): --n × --batch-size images in all, image i with
    /// seed + i; each batch is saved as soon as it is done.
    #[arg(short = 'n', long, visible_alias = "batch-count", default_value_t = 1, value_parser = count, allow_negative_numbers = true)]
    pub n: usize,
    /// Images per batch, made together (faster on a GPU); the memory planner lowers it where it
    /// does not fit, and says so.
    #[arg(long, default_value_t = 1, value_parser = count, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Seed of the first image; -1 or omitted: random (always printed and recorded).
    #[arg(short = 's', long, value_parser = seed, allow_negative_numbers = true)]
    pub seed: Option<Seed>,
    /// Denoising steps (model default when omitted).
    #[arg(long, value_parser = count, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (model default when omitted).
    #[arg(long, visible_alias = "cfg-scale", allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Image width in pixels (model default when omitted).
    #[arg(short = 'W', long, value_parser = count, allow_negative_numbers = true)]
    pub width: Option<usize>,
    /// Image height in pixels (model default when omitted).
    #[arg(short = 'H', long, value_parser = count, allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// Scheduler: pndm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras or lcm, or A1111's names
    /// (PLMS, DDIM, Euler, "Euler a", "DPM++ 2M", "DPM++ 2M Karras", LCM), any case (the model's
    /// own when omitted).
    #[arg(long, visible_aliases = ["sampler", "sampling-method"])]
    pub scheduler: Option<String>,
    /// Folder for the images and their metadata (created when the first image is saved), or a
    /// file name ending in .png (result.png; result-1.png, result-2.png, … for several images),
    /// never overwritten.
    #[arg(short = 'o', long, default_value = "outputs")]
    pub output: PathBuf,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations dtype: f32, f16 or bf16 (f32 on the CPU, bf16 on GPUs by default).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Use only the local Hugging Face cache (as HF_HUB_OFFLINE=1 does).
    #[arg(long)]
    pub offline: bool,
    /// For a single-file checkpoint: a diffusers folder whose configs and tokenizer to use
    /// instead of the family's standard ones.
    #[arg(long, value_name = "DIR")]
    pub config_from: Option<PathBuf>,
    /// Quantise the denoiser's linear weights as they load: q8 (Q8_0, near-lossless, ~half of
    /// bf16), fp8 (E4M3 with a scale per tensor, half of bf16) or q4 (Q4_K, ~a quarter). A GGUF or
    /// fp8 file is quantised already.
    #[arg(long, value_name = "q8|fp8|q4")]
    pub weights: Option<String>,
    /// Memory the run may use, e.g. 8GB (GB = 2^30 bytes as the console prints; device memory on a
    /// GPU, process memory on the CPU). Default: what is free.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// How the memory planner trades speed for memory: auto, fast, balanced or low.
    #[arg(long, default_value = "auto")]
    pub memory_mode: String,
    /// Keep each stage's loaded weights for the next batch or prompt while the memory plan has
    /// room for them (evicted least recently used when a stage needs it), instead of dropping
    /// them when the stage ends: faster runs of several batches (--n, --prompt-file).
    #[arg(long)]
    pub keep_warm: bool,
    /// Print this machine's memory, what each model family needs and whether and how it would run
    /// here, then exit.
    #[arg(long)]
    pub check: bool,
    /// Print the named models (sdxl, sd15, …) with their repositories and whether each is
    /// downloaded, then exit.
    #[arg(long)]
    pub list_models: bool,
    /// A quality preset (default, 4k, lcm; see --list-presets): its model, LoRAs, size, steps,
    /// guidance, scheduler and passes (4k: upscale ×2, then a hires pass at 2048²; lcm: SDXL with
    /// the LCM-LoRA, 4 LCM steps at guidance 1), each overridable by its own flag (--steps 20
    /// --quality 4k runs 20 steps).
    #[arg(long, value_name = "NAME")]
    pub quality: Option<String>,
    /// Print the quality presets with their model, size, steps, guidance, scheduler and passes,
    /// then exit.
    #[arg(long)]
    pub list_presets: bool,
    /// Upscale the finished images by 2, 3 or 4 (each side) with Lanczos, PIL's exactly (after
    /// the refiner, if any).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub upscale: Option<u32>,
    /// After upscaling: rework each upscaled image by image-to-image with the same model at this
    /// strength, from 0 (keep) to 1 (replace) (A1111's hires fix) [default: none; 0.3 with
    /// --quality 4k].
    #[arg(long, value_name = "STRENGTH", allow_negative_numbers = true)]
    pub hires_strength: Option<f64>,
    /// Re-run the settings of an image: its A1111 `parameters` text (this tool's or A1111's) and
    /// its JSON sidecar where there is one beside it: prompt, negative prompt, seed, size, steps,
    /// sampler, guidance, model, LoRAs, VAE, clip skip, refiner, upscale and hires pass, preset.
    /// Any other flag given wins over the image's value.
    #[arg(long, value_name = "FILE.png")]
    pub from_png: Option<PathBuf>,
    /// Only warnings and errors on stderr: no progress, plan or memory lines.
    #[arg(short = 'q', long, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Every denoising step on its own line, and what runs: the kernels and the memory options.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Print one machine-readable JSON result on stdout.
    #[arg(long)]
    pub json: bool,
    /// Threads for the work done on the CPU (the CPU device's stages, loading, image encoding).
    /// Default: every core (or RAYON_NUM_THREADS).
    #[arg(long, value_name = "N", value_parser = count, allow_negative_numbers = true)]
    pub threads: Option<usize>,
    /// Run candle's stock kernels instead of the fast CUDA ones (cuDNN convolutions, fused
    /// GroupNorm/softmax/GEGLU, copy-free attention), to rule them out when reporting a problem
    /// (also: SDGEN_NO_FAST_KERNELS=1).
    #[arg(long)]
    pub no_fast_kernels: bool,
    /// Start from this picture instead of noise (image-to-image; PNG, JPEG or WebP). The output
    /// has its size rounded down to a multiple of 8, unless --width/--height say otherwise.
    #[arg(long, value_name = "PATH")]
    pub init_image: Option<PathBuf>,
    /// Run the job on an sdgen-server (http://host:7860) instead of this machine: the same
    /// flags, progress shown here, the PNG and sidecar written here as a local run writes them
    /// (the sidecar's extra.remote says where it ran). The server's default model when
    /// --model is not given.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// With --remote: the server's API key (also: SDGEN_API_KEY).
    #[arg(long, value_name = "KEY", requires = "remote")]
    pub api_key: Option<String>,
    /// With --init-image: how much to change it, from 0 (keep) to 1 (replace entirely); only the
    /// last strength × steps steps run [default: the model's, 0.8 for SD 1.5, 0.3 for SDXL].
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Option<f64>,
}

/// The arguments, resolved: the engine's request and configuration, and where the images go.
pub struct Resolved {
    pub request: GenerateRequest,
    pub engine: EngineConfig,
    pub output: OutputTarget,
}

impl Args {
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let scheduler = match &self.scheduler {
            Some(s) => Some(s.parse::<SchedulerKind>().map_err(anyhow::Error::new)?),
            None => None,
        };
        let (device, device_label) = sdgen::engine::open_device(&self.device)?;
        let dtype = match self.dtype.as_deref() {
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
            Some("f32" | "fp32" | "float32") => DType::F32,
            Some("f16" | "fp16" | "float16") => DType::F16,
            Some("bf16" | "bfloat16") => DType::BF16,
            Some(other) => return Err(invalid(format!("--dtype {other} is not one of f32, f16, bf16"))),
        };
        let prompts = self.prompts()?;
        let prompt = prompts[0].clone();
        sdgen::engine::check_dtype(&device, dtype)?;
        // The init image is read now, so a bad path or file costs no model loading.
        let img2img = match (&self.init_image, self.strength) {
            (None, Some(_)) => {
                return Err(invalid(
                    "--strength needs --init-image: it sets how much of the init image to change".into(),
                ))
            }
            (None, None) => None,
            (Some(path), strength) => {
                if let Some(s) = strength {
                    check_strength(s)?;
                }
                let image = InitImage::load(path).map_err(|e| match e {
                    // "--init-image: /path: No such file or directory"; decoding errors name it already.
                    sdgen::Error::Io { .. } => anyhow::Error::new(e).context("--init-image"),
                    other => other.into(),
                })?;
                Some(Img2ImgInput { image, strength })
            }
        };
        let refiner = match &self.refiner {
            None if self.refiner_start.is_some() => return Err(invalid("--refiner-start needs --refiner".into())),
            None if self.refiner_strength.is_some() => {
                return Err(invalid("--refiner-strength needs --refiner".into()))
            }
            None => None,
            Some(r) => Some(RefinerRequest {
                source: ModelSource::parse(r),
                start: self.refiner_start,
                strength: self.refiner_strength,
            }),
        };
        let per_job = self.n.checked_mul(self.batch_size);
        let all = per_job.and_then(|t| t.checked_mul(prompts.len())).filter(|&t| t <= MAX_IMAGES);
        let (Some(total), Some(_)) = (per_job, all) else {
            return Err(invalid(format!(
                "--n {} × --batch-size {} × {} is more than the {MAX_IMAGES} images one run makes: split it \
                 into several runs (each with its own --seed)",
                self.n,
                self.batch_size,
                crate::plural(prompts.len(), "prompt")
            )));
        };
        let seed = match self.seed {
            Some(Seed::Fixed(s)) => s,
            Some(Seed::Random) | None => random_seed(),
        };
        let output = OutputTarget::parse(&self.output)?;
        let mut hub = HubOptions::from_env();
        hub.offline |= self.offline;
        // Half-precision runs fetch the smaller fp16 weights where a repository has them.
        if dtype != DType::F32 && hub.variant.is_none() {
            hub.variant = Some("fp16".to_string());
        }
        let memory = sdgen::planning::MemoryRequest {
            max_memory_bytes: match &self.max_memory {
                Some(v) => Some(
                    // The parser's message names the flag and the value already.
                    sdgen_memory::plan::parse_memory_size(v).map_err(|e| invalid(e.to_string()))?,
                ),
                None => None,
            },
            mode: self.memory_mode.parse().map_err(|e| invalid(format!("--memory-mode: {e}")))?,
            max_images_per_batch: Some(self.batch_size),
            ..Default::default()
        };
        // A preset is found (or refused, listing them) before anything else is touched.
        let preset = self.quality.as_deref().map(sdgen::presets::find).transpose()?;
        let mut request = GenerateRequest {
            model: ModelSource::parse(self.model_name(preset)),
            open: OpenOptions {
                config_from: self.config_from.clone(),
                weights: self
                    .weights
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(|e| invalid(format!("--weights: {e}")))?,
            },
            vae: self.vae.as_deref().map(ModelSource::parse),
            refiner,
            loras: self.lora.iter().map(|v| LoraRequest::parse(v)).collect::<Result<_, _>>()?,
            params: Request {
                prompt,
                negative_prompt: self.negative.clone(),
                n: total,
                seed,
                steps: self.steps,
                guidance: self.guidance,
                width: self.width,
                height: self.height,
                scheduler,
                family_options: FamilyOptions {
                    max_sequence_length: self.max_sequence_length,
                    no_t5: self.no_t5,
                    skip_layer_guidance: self.slg.clone().map(|layers| SkipLayerGuidance {
                        scale: self.slg_scale.unwrap_or(SkipLayerGuidance::DEFAULT_SCALE),
                        ..SkipLayerGuidance::new(layers)
                    }),
                },
                prompt_options: sdgen::prompt::PromptOptions {
                    style: match self.prompt_style.as_str() {
                        "diffusers" => sdgen::prompt::PromptStyle::Diffusers,
                        _ => sdgen::prompt::PromptStyle::A1111,
                    },
                    clip_skip: self.clip_skip,
                },
            },
            prompts,
            img2img,
            memory,
            upscale: self
                .upscale
                .map(|factor| UpscaleRequest { factor, hires_strength: None, tiled: false })
                .into_iter()
                .collect(),
            preset: None,
        };
        if let Some(p) = preset {
            p.apply(&mut request)?;
        }
        if let Some(s) = self.hires_strength {
            if request.upscale.is_empty() {
                return Err(invalid(
                    "--hires-strength needs --upscale (or a --quality preset that upscales): the hires pass \
                     reworks the upscaled images"
                        .into(),
                ));
            }
            // Every hires pass of the preset's chain (4k-ultra has two).
            request.upscale.iter_mut().for_each(|u| u.hires_strength = Some(s));
        }
        // What needs no model is refused now, before the output is touched (`--check` runs
        // without a prompt).
        if !self.check {
            request.validate()?;
        }
        let mut engine = EngineConfig::new(Runtime::new(device, dtype), device_label);
        engine.hub = hub;
        engine.warm = self.keep_warm.then(sdgen::engine::WarmWeights::new);
        engine.field_names = flag;
        Ok(Resolved { request, engine, output })
    }
}

impl Args {
    /// The model asked for: `--model`, SD 3.5 Large for `--pro`, else the preset's, else the
    /// default.
    pub fn model_name(&self, preset: Option<&Preset>) -> &str {
        match (&self.model, self.pro) {
            (Some(m), _) => m,
            (None, true) => PRO_MODEL,
            (None, false) => preset.map_or(DEFAULT_MODEL, |p| p.model),
        }
    }

    /// The prompts: the positional or `-p`, a `--prompt-file`'s lines, or standard input's for `-`.
    fn prompts(&self) -> anyhow::Result<Vec<String>> {
        let lines = |text: String| -> Vec<String> {
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
        };
        let prompts = match (&self.prompt_file, self.prompt.as_deref()) {
            (Some(path), _) => lines(
                std::fs::read_to_string(path).map_err(|e| invalid(format!("--prompt-file {}: {e}", path.display())))?,
            ),
            (None, Some("-")) => {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .map_err(|e| invalid(format!("reading prompts from standard input: {e}")))?;
                lines(text)
            }
            // An empty prompt is a prompt (diffusers encodes "" as it does any text: an image of
            // no prompt, A1111's default); no prompt at all is a forgotten one.
            (None, p) => match p.map(str::to_string).or_else(|| self.prompt_flag.clone()) {
                Some(p) => vec![p],
                // `--check` plans without one.
                None if self.check => vec![String::new()],
                None => return Err(invalid(
                    "no prompt: say what to draw (generate \"a lighthouse at dusk\"), or pass \"\" for an image of \
                         no prompt"
                        .into(),
                )),
            },
        };
        if prompts.is_empty() {
            return Err(invalid("no prompts: the file or standard input has no non-blank line".into()));
        }
        Ok(prompts)
    }
}

/// The flag that sets each field of the engine's request, for its errors, warnings and log
/// lines to name (the engine's field references, `sdgen::error`).
const FLAGS: &[(&str, &str)] = &[
    ("model", "--model"),
    ("config_from", "--config-from"),
    ("n", "--n"),
    ("batch_size", "--batch-size"),
    ("seed", "--seed"),
    ("steps", "--steps"),
    ("guidance", "--guidance"),
    ("width", "--width"),
    ("height", "--height"),
    ("scheduler", "--scheduler"),
    ("strength", "--strength"),
    ("init_image", "--init-image"),
    ("vae", "--vae"),
    ("refiner", "--refiner"),
    ("refiner_start", "--refiner-start"),
    ("refiner_strength", "--refiner-strength"),
    ("no_t5", "--no-t5"),
    ("max_sequence_length", "--max-sequence-length"),
    ("skip_layer_guidance", "--slg"),
    ("prompt_style", "--prompt-style"),
    ("clip_skip", "--clip-skip"),
    ("lora", "--lora"),
    ("weights", "--weights"),
    ("device", "--device"),
    ("dtype", "--dtype"),
    ("upscale", "--upscale"),
    ("hires_strength", "--hires-strength"),
    ("quality", "--quality"),
    ("from_png", "--from-png"),
    ("output", "--output"),
    ("max_memory", "--max-memory"),
    ("memory_mode", "--memory-mode"),
];

/// The flag of a request field.
pub fn flag(field: &'static str) -> Option<&'static str> {
    FLAGS.iter().find(|(f, _)| *f == field).map(|&(_, flag)| flag)
}

/// `--seed`: a number, or -1 for a random one (A1111's and stable-diffusion.cpp's convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seed {
    Fixed(u64),
    Random,
}

fn seed(value: &str) -> Result<Seed, String> {
    match value.trim() {
        "-1" => Ok(Seed::Random),
        v => v
            .parse::<u64>()
            .map(Seed::Fixed)
            .map_err(|_| format!("`{v}` is not a seed: a whole number from 0 to {}, or -1 for a random one", u64::MAX)),
    }
}

/// A count or size: a whole number ≥ 1 (a negative one gets this message, not clap's advice to
/// pass it after `--`).
fn count(value: &str) -> Result<usize, String> {
    match value.trim().parse::<i128>() {
        Ok(v) if v >= 1 => usize::try_from(v).map_err(|_| format!("{v} is too large")),
        Ok(v) => Err(format!("{v} is out of range: a whole number ≥ 1 is needed")),
        Err(_) => Err(format!("`{value}` is not a whole number")),
    }
}

fn invalid(message: String) -> anyhow::Error {
    sdgen::Error::InvalidInput(message).into()
}

/// A seed from the clock, for runs that give none (it is printed and recorded).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64 ^ (std::process::id() as u64) << 32) % (1 << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field an engine error can name has its flag, so no message names a JSON field.
    #[test]
    fn every_request_field_has_a_flag() {
        for field in sdgen::engine::FIELDS {
            assert!(flag(field).is_some(), "{field} has no flag");
        }
        let err = sdgen::Error::about("refiner", sdgen::Error::invalid("width", "100 is not a multiple of 8"));
        assert_eq!(err.describe(&flag), "--refiner: --width 100 is not a multiple of 8");
        assert_eq!(err.to_string(), "refiner: width 100 is not a multiple of 8");
    }
}
