//! The job API's JSON, defined once for both ends: what `sdgen-server`'s `POST /v1/jobs` takes
//! ([`JobBody`]) and what its `GET /v1/jobs/{id}/events` stream sends ([`JobEvent`]), so the
//! server and `generate --remote` cannot drift apart. Field names are the engine's request
//! fields ([`FIELDS`](super::FIELDS)), so an error about one names it the same way everywhere.

use serde::{Deserialize, Serialize};

/// `POST /v1/jobs`'s body: a prompt (or several) and every setting the engine takes over HTTP.
/// Unknown fields are refused (a misspelt setting must not be silently ignored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobBody {
    /// What to draw (absent or empty when `prompts` is given).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prompt: String,
    /// Several prompts instead of `prompt`, `n` images each, in one job: image `g` of the whole
    /// job takes `seed + g`, so the seeds continue from one prompt's images to the next (as
    /// `generate --prompt-file` runs them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<Vec<String>>,
    /// What not to draw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// The model, as the server may open it (its default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A VAE replacing the model's own: a hub repository, or a folder the server was started
    /// with (`--extra-vae`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// LoRAs fused into the model, in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraBody>,
    /// A quality preset (`default`, `4k`; see `generate --list-presets`): it fills in the size,
    /// steps, guidance, scheduler and passes this body leaves open (not the model: absent, it
    /// is the server's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    /// Upscaling the finished images, then optionally the hires pass: one step, or a list of
    /// steps run in order (a `4k-ultra` chain as `generate --remote` resolves it).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "one_or_many")]
    pub upscale: Vec<UpscaleBody>,
    /// Images per prompt (1 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    /// Most images made together (1 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// The first image's seed; -1, null or absent: random.
    #[serde(default)]
    pub seed: Seed,
    /// Denoising steps (the model's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// Width in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Height in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    /// A scheduler by any of its names (ours or A1111's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Image-to-image: the starting picture, base64 PNG, JPEG or WebP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    /// With `init_image`: how much to change it, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// SD 3.5: without the T5 encoder.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_t5: bool,
    /// SD 3.5: tokens the T5 encoder reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequence_length: Option<usize>,
    /// SD 3.5: skip-layer guidance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_layer_guidance: Option<SkipLayers>,
    /// A refiner finishing the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner: Option<String>,
    /// With `refiner` after SDXL: the fraction of the steps the base runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner_start: Option<f64>,
    /// With `refiner` after SD 3.5: how much of the base's image it reworks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refiner_strength: Option<f64>,
    /// The denoiser's linear weights quantised as they load (`q8` or `q4`, as `--weights`);
    /// absent: as stored. A quantised model is its own warm entry, never served to a
    /// full-precision job (nor the reverse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

/// A LoRA as the job API takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraBody {
    /// A hub repository holding one `.safetensors` file, or a file the server was started with
    /// (`--extra-lora`).
    pub source: String,
    /// How much of it to apply (1 when absent: the LoRA as trained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

/// Upscaling as the job API takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpscaleBody {
    /// Each side is multiplied by this (2, 3 or 4), with PIL's Lanczos.
    pub factor: u32,
    /// Then a hires image-to-image pass over the upscaled images at this strength in [0, 1];
    /// absent: none (a `quality` preset's when it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires_strength: Option<f64>,
    /// The hires pass denoises in MultiDiffusion's overlapping tiles of the model's native size.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tiled: bool,
}

/// A list written as its one element when it has one (the job API's `upscale` is one step in
/// the common case), read from either form.
mod one_or_many {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => one.serialize(s),
            all => all.serialize(s),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany<T> {
            One(T),
            Many(Vec<T>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(all) => all,
        })
    }
}

/// Skip-layer guidance as the job API takes it: the blocks skipped and, optionally, the scale.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipLayers {
    /// The transformer blocks skipped.
    pub layers: Vec<usize>,
    /// The guidance scale (diffusers' 2.8 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
}

impl SkipLayers {
    /// The pipeline's setting: diffusers' window, the scale given or its default.
    pub fn to_guidance(&self) -> crate::pipeline::SkipLayerGuidance {
        let default = crate::pipeline::SkipLayerGuidance::new(self.layers.clone());
        crate::pipeline::SkipLayerGuidance { scale: self.scale.unwrap_or(default.scale), ..default }
    }
}

/// A seed as A1111 takes it: any non-negative integer, or -1 (and null or absent) for a random
/// one, which the server draws (and records in every image's metadata).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seed(pub Option<u64>);

impl Serialize for Seed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => s.serialize_u64(v),
            None => s.serialize_i64(-1),
        }
    }
}

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = Option::<serde_json::Number>::deserialize(d)?;
        match n {
            None => Ok(Seed(None)),
            Some(n) if n.as_i64() == Some(-1) => Ok(Seed(None)),
            Some(n) => match n.as_u64() {
                Some(v) => Ok(Seed(Some(v))),
                None => Err(serde::de::Error::custom(format!(
                    "{n} is not a seed: use an integer from 0 to {}, or -1 for a random one",
                    u64::MAX
                ))),
            },
        }
    }
}

/// One thing that happened to a job, as its event stream sends it: the SSE event's name is
/// [`JobEvent::name`], its data this as JSON (with the name again in `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    /// Accepted into the queue, `position` jobs ahead of it (the running one included).
    Queued {
        /// Jobs ahead.
        position: usize,
    },
    /// The worker took it.
    Started,
    /// A pipeline stage began (`text_encoder`, `unet`, `vae`…).
    StageStart {
        /// The stage.
        stage: String,
    },
    /// A pipeline stage ended.
    StageEnd {
        /// The stage.
        stage: String,
        /// Its wall time.
        elapsed_ms: f64,
    },
    /// Denoising step `step` of `steps` of the current batch finished.
    Step {
        /// Steps done.
        step: usize,
        /// Steps of the batch.
        steps: usize,
        /// Images of the job finished.
        images_done: usize,
        /// Images the job makes.
        images: usize,
    },
    /// An image is ready.
    Image {
        /// Its index in the job.
        index: usize,
        /// Its seed.
        seed: u64,
        /// Where its PNG is (a path on the server).
        url: String,
    },
    /// A line of the engine's log.
    Log {
        /// The line.
        message: String,
        /// The line with each field it names written `{field}` (as [`JobEvent::Failed`]'s);
        /// absent when it names none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<String>,
    },
    /// A warning (a tight plan, a truncated prompt…).
    Warning {
        /// The warning.
        message: String,
        /// The warning with each field it names written `{field}`; absent when it names none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<String>,
    },
    /// Finished.
    Done {
        /// Images made.
        images: usize,
    },
    /// Ended by an error.
    Failed {
        /// The HTTP status the error maps to (422: the request; 500: generating).
        status: u16,
        /// The request field it is about.
        field: Option<String>,
        /// What went wrong.
        message: String,
        /// The message with each field it names written `{field}` (the engine's names), for a
        /// client to word with its own ([`crate::error::fill`]); absent when it names none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<String>,
    },
    /// Cancelled.
    Cancelled {
        /// Images finished before it stopped.
        images: usize,
    },
}

impl JobEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::Queued { .. } => "queued",
            JobEvent::Started => "started",
            JobEvent::StageStart { .. } => "stage_start",
            JobEvent::StageEnd { .. } => "stage_end",
            JobEvent::Step { .. } => "step",
            JobEvent::Image { .. } => "image",
            JobEvent::Log { .. } => "log",
            JobEvent::Warning { .. } => "warning",
            JobEvent::Done { .. } => "done",
            JobEvent::Failed { .. } => "failed",
            JobEvent::Cancelled { .. } => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_reads_back_as_written_and_absent_fields_stay_out() {
        let body = JobBody {
            prompt: "a cat".into(),
            seed: Seed(Some(7)),
            steps: Some(4),
            skip_layer_guidance: Some(SkipLayers { layers: vec![7, 8], scale: None }),
            ..Default::default()
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"prompt": "a cat", "seed": 7, "steps": 4, "skip_layer_guidance": {"layers": [7, 8]}})
        );
        assert_eq!(serde_json::from_value::<JobBody>(json).unwrap(), body);
        let random: JobBody = serde_json::from_str(r#"{"prompt": "x", "seed": -1}"#).unwrap();
        assert_eq!(random.seed, Seed(None));
        assert!(serde_json::from_str::<JobBody>(r#"{"prompt": "x", "sed": 1}"#).is_err());
    }

    #[test]
    fn the_passes_loras_and_prompts_read_back_as_written() {
        let body = JobBody {
            prompts: Some(vec!["a cat".into(), "a dog".into()]),
            vae: Some("madebyollin/sdxl-vae-fp16-fix".into()),
            loras: vec![LoraBody { source: "org/lora".into(), scale: Some(0.5) }],
            quality: Some("4k".into()),
            upscale: vec![UpscaleBody { factor: 2, hires_strength: Some(0.3), tiled: false }],
            ..Default::default()
        };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"prompts": ["a cat", "a dog"], "seed": -1, "vae": "madebyollin/sdxl-vae-fp16-fix",
                "loras": [{"source": "org/lora", "scale": 0.5}], "quality": "4k",
                "upscale": {"factor": 2, "hires_strength": 0.3}})
        );
        assert_eq!(serde_json::from_value::<JobBody>(json).unwrap(), body);
        assert!(serde_json::from_str::<JobBody>(r#"{"prompt": "x", "upscale": {"factr": 2}}"#).is_err());
        // A chain (4k-ultra's) as a list, its tiled passes marked.
        let chain = vec![UpscaleBody { factor: 2, hires_strength: Some(0.3), tiled: true }; 2];
        let body = JobBody { upscale: chain, ..Default::default() };
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(
            json["upscale"],
            serde_json::json!([{"factor": 2, "hires_strength": 0.3, "tiled": true}, {"factor": 2, "hires_strength": 0.3, "tiled": true}])
        );
        assert_eq!(serde_json::from_value::<JobBody>(json).unwrap(), body);
    }

    #[test]
    fn events_read_back_as_sent() {
        let e = JobEvent::Failed {
            status: 422,
            field: Some("width".into()),
            message: "width 7 is odd".into(),
            template: Some("{width} 7 is odd".into()),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.starts_with(r#"{"type":"failed""#), "{text}");
        assert_eq!(serde_json::from_str::<JobEvent>(&text).unwrap(), e);
    }
}
