//! How each API names the engine's request fields, one table per API: for the field an error is
//! about (`field` in its body) and for the fields its message refers to ("raise `strength` or
//! `steps`", [`sdgen::error`]), so a client reads the names it sends. A field a table does not
//! list keeps the engine's name, which is the job API's JSON field for most of them.

use sdgen::error::FieldNames;

use crate::jobs::Api;

/// The job API's names where they differ from the engine's: the fields its body nests or spells
/// in the plural.
const JOB_FIELDS: &[(&str, &str)] =
    &[("lora", "loras"), ("upscale", "upscale.factor"), ("hires_strength", "upscale.hires_strength")];

/// A1111's names (its `StableDiffusionProcessingTxt2Img`/`Img2Img` fields) where they differ.
const A1111_FIELDS: &[(&str, &str)] = &[
    ("model", "sd_model_checkpoint"),
    ("n", "n_iter"),
    ("guidance", "cfg_scale"),
    ("scheduler", "sampler_name"),
    ("strength", "denoising_strength"),
    ("init_image", "init_images"),
    ("refiner", "refiner_checkpoint"),
    ("refiner_start", "refiner_switch_at"),
    ("upscale", "hr_scale"),
    ("hires_strength", "denoising_strength"),
];

/// Fields no request sets on this server: its own flags, which its operator sets (the planner's
/// advice for a job that does not fit may name them).
const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("max_memory", "the server's --max-memory"),
    ("dtype", "the server's --dtype"),
    ("device", "the server's --device"),
];

fn lookup(table: &[(&str, &'static str)], field: &'static str) -> &'static str {
    table.iter().chain(SERVER_SETTINGS).find(|(f, _)| *f == field).map_or(field, |&(_, name)| name)
}

/// The job API's name of an engine field.
pub fn job_field(field: &'static str) -> Option<&'static str> {
    Some(lookup(JOB_FIELDS, field))
}

/// A1111's name of an engine field.
pub fn a1111_field(field: &'static str) -> Option<&'static str> {
    Some(lookup(A1111_FIELDS, field))
}

impl Api {
    /// How this API names the engine's fields.
    pub fn field_names(self) -> FieldNames {
        match self {
            Api::Jobs => job_field,
            Api::A1111 => a1111_field,
        }
    }

    /// This API's name of `field`.
    pub fn field(self, field: &'static str) -> &'static str {
        self.field_names()(field).unwrap_or(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_api_names_the_engine_fields_its_own_way() {
        assert_eq!(Api::A1111.field("guidance"), "cfg_scale");
        assert_eq!(Api::A1111.field("init_image"), "init_images");
        assert_eq!(Api::A1111.field("strength"), "denoising_strength");
        assert_eq!(Api::A1111.field("width"), "width");
        assert_eq!(Api::Jobs.field("lora"), "loras");
        assert_eq!(Api::Jobs.field("strength"), "strength");
        // Every table row is an engine field.
        for (field, _) in JOB_FIELDS.iter().chain(A1111_FIELDS) {
            assert!(sdgen::engine::FIELDS.contains(field), "{field} is not an engine field");
        }
    }

    /// A message's field references, and the field it is about, read as each API names them.
    #[test]
    fn messages_name_the_apis_fields() {
        use sdgen::error::field::{STEPS, STRENGTH};
        let err = sdgen::Error::invalid("strength", format!("0.1 with 4 steps: raise {STRENGTH} or {STEPS}"));
        assert_eq!(err.describe(&Api::Jobs.field_names()), "strength 0.1 with 4 steps: raise strength or steps");
        assert_eq!(
            err.describe(&Api::A1111.field_names()),
            "denoising_strength 0.1 with 4 steps: raise denoising_strength or steps"
        );
    }
}
