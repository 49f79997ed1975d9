//! Model families, recognised through a table (as diffusers' `CHECKPOINT_KEY_NAMES`), not an
//! if-chain: a family is named by the pipeline class of `model_index.json` and confirmed by
//! marker tensors of its denoiser.

/// How one family is recognised and what it needs.
#[derive(Debug)]
pub struct FamilySpec {
    /// Short name used on the command line and in metadata (`sd15`).
    pub name: &'static str,
    /// Human name.
    pub display: &'static str,
    /// `_class_name` values of `model_index.json` that belong to this family.
    pub pipeline_classes: &'static [&'static str],
    /// Tensors the denoiser must have.
    pub denoiser_markers: &'static [&'static str],
    /// Tensors whose presence means another family.
    pub denoiser_excludes: &'static [&'static str],
    /// `pipeline_type` recorded in the metadata.
    pub pipeline_type: &'static str,
    /// Image sides must be multiples of this (VAE factor × patch size).
    pub size_multiple: usize,
    /// Default steps when none are given (diffusers' pipeline default).
    pub default_steps: usize,
    /// Default classifier-free guidance scale.
    pub default_guidance: f64,
}

/// Every family this build can run.
pub const FAMILIES: &[FamilySpec] = &[FamilySpec {
    name: "sd15",
    display: "Stable Diffusion 1.5",
    pipeline_classes: &["StableDiffusionPipeline"],
    denoiser_markers: &["conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight"],
    denoiser_excludes: &["add_embedding.linear_1.weight"],
    pipeline_type: "StableDiffusionPipeline (SD 1.5)",
    size_multiple: 8,
    default_steps: 50,
    default_guidance: 7.5,
}];

/// Finds the family of a diffusers folder from its pipeline class and its denoiser's tensor names.
pub fn detect<'a>(pipeline_class: &str, has_tensor: impl Fn(&str) -> bool) -> Option<&'a FamilySpec> {
    FAMILIES.iter().find(|f| {
        f.pipeline_classes.contains(&pipeline_class)
            && f.denoiser_markers.iter().all(|k| has_tensor(k))
            && !f.denoiser_excludes.iter().any(|k| has_tensor(k))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_needs_its_markers_and_no_sdxl_embedding() {
        let sd15 = |k: &str| FAMILIES[0].denoiser_markers.contains(&k);
        assert_eq!(detect("StableDiffusionPipeline", sd15).map(|f| f.name), Some("sd15"));
        let sdxl = |k: &str| sd15(k) || k == "add_embedding.linear_1.weight";
        assert!(detect("StableDiffusionPipeline", sdxl).is_none());
        assert!(detect("StableDiffusionXLPipeline", sd15).is_none());
        assert!(detect("StableDiffusionPipeline", |_| false).is_none());
    }
}
