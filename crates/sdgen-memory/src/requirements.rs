//! The seed's memory requirement table ("Memory Requirements — By Model Type"), as data:
//!
//! | Model | Minimum RAM | Recommended RAM |
//! |-------|-------------|-----------------|
//! | SD 1.5 | 8GB | 16GB |
//! | SDXL | 16GB | 24GB |
//! | SD 3.5 Large | 36GB | 48GB+ |
//!
//! "GB" are GiB, as everywhere in the seed's output: Apple's "36GB" machines have 36 GiB. The
//! figures are the seed's (measured for its Python/MPS predecessor); the planner refines them
//! from the model files' headers, and these drive the early warnings.

use crate::console::{format_low_memory_warning, BYTES_PER_GB};
use serde::{Deserialize, Serialize};

/// The model classes of the seed's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelClass {
    /// Stable Diffusion 1.5 (and its LCM variant).
    Sd15,
    /// SDXL base, refiner, Turbo, LCM.
    Sdxl,
    /// Stable Diffusion 3.5 Large (and Large Turbo).
    Sd35Large,
    /// Stable Diffusion 3.5 Medium: not in the seed's table (written for Large), which would
    /// warn every Medium user below 36 GB; its 2.5B MMDiT and T5-XXL in bf16 need about SDXL's
    /// memory plus T5's 9.5 GB, unless T5 runs on the host or is left out.
    Sd35Medium,
}

/// One row of the requirement table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelRequirement {
    /// Which models the row covers.
    pub class: ModelClass,
    /// Name used in messages ("SD 3.5 Large").
    pub display_name: &'static str,
    /// Below this much available memory, generation may fail or be very slow.
    pub minimum_bytes: u64,
    /// With this much, generation runs comfortably.
    pub recommended_bytes: u64,
    /// What to use instead when memory is short (completes the warning's "Consider using …
    /// instead" line); the seed's advice for SD 3.5.
    pub suggestion: Option<&'static str>,
}

/// The seed's table, smallest model first.
pub const MODEL_REQUIREMENTS: [ModelRequirement; 4] = [
    ModelRequirement {
        class: ModelClass::Sd15,
        display_name: "SD 1.5",
        minimum_bytes: 8 * BYTES_PER_GB,
        recommended_bytes: 16 * BYTES_PER_GB,
        suggestion: Some("--remote URL (an sdgen-server)"),
    },
    ModelRequirement {
        class: ModelClass::Sdxl,
        display_name: "SDXL",
        minimum_bytes: 16 * BYTES_PER_GB,
        recommended_bytes: 24 * BYTES_PER_GB,
        suggestion: Some("--model sd15 (SD 1.5)"),
    },
    ModelRequirement {
        class: ModelClass::Sd35Large,
        display_name: "SD 3.5 Large",
        minimum_bytes: 36 * BYTES_PER_GB,
        recommended_bytes: 48 * BYTES_PER_GB,
        suggestion: Some("--quality 4k-ultra (SDXL)"),
    },
    ModelRequirement {
        class: ModelClass::Sd35Medium,
        display_name: "SD 3.5 Medium",
        minimum_bytes: 20 * BYTES_PER_GB,
        recommended_bytes: 32 * BYTES_PER_GB,
        suggestion: Some("--model sdxl (SDXL)"),
    },
];

/// How available memory compares with a requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryVerdict {
    /// At least the recommended amount.
    Comfortable,
    /// Between minimum and recommended: it runs, maybe slowly.
    BelowRecommended,
    /// Below the minimum: warn (the seed's low-memory warning).
    BelowMinimum,
}

impl ModelClass {
    /// This class's row of [`MODEL_REQUIREMENTS`].
    pub fn requirement(self) -> &'static ModelRequirement {
        // The table has exactly one row per class, in declaration order.
        &MODEL_REQUIREMENTS[self as usize]
    }
}

impl ModelRequirement {
    /// Classifies `available_bytes` against this row.
    pub fn verdict(&self, available_bytes: u64) -> MemoryVerdict {
        if available_bytes < self.minimum_bytes {
            MemoryVerdict::BelowMinimum
        } else if available_bytes < self.recommended_bytes {
            MemoryVerdict::BelowRecommended
        } else {
            MemoryVerdict::Comfortable
        }
    }

    /// The seed's low-memory warning when `available_bytes` is below the minimum, else `None`.
    pub fn low_memory_warning(&self, available_bytes: u64) -> Option<String> {
        (self.verdict(available_bytes) == MemoryVerdict::BelowMinimum)
            .then(|| format_low_memory_warning(available_bytes, self.display_name, self.minimum_bytes, self.suggestion))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_the_seeds() {
        let gb = |r: &ModelRequirement| (r.minimum_bytes / BYTES_PER_GB, r.recommended_bytes / BYTES_PER_GB);
        assert_eq!(gb(ModelClass::Sd15.requirement()), (8, 16));
        assert_eq!(gb(ModelClass::Sdxl.requirement()), (16, 24));
        assert_eq!(gb(ModelClass::Sd35Large.requirement()), (36, 48));
        for class in [ModelClass::Sd15, ModelClass::Sdxl, ModelClass::Sd35Large, ModelClass::Sd35Medium] {
            assert_eq!(class.requirement().class, class);
        }
    }

    #[test]
    fn verdicts_and_warning() {
        let sd35 = ModelClass::Sd35Large.requirement();
        assert_eq!(sd35.verdict(48 * BYTES_PER_GB), MemoryVerdict::Comfortable);
        assert_eq!(sd35.verdict(40 * BYTES_PER_GB), MemoryVerdict::BelowRecommended);
        assert_eq!(sd35.low_memory_warning(40 * BYTES_PER_GB), None);
        let available = (25.3 * BYTES_PER_GB as f64) as u64;
        assert_eq!(
            sd35.low_memory_warning(available).unwrap(),
            "⚠️  WARNING: Low memory detected (25.3GB available)\n\
             \x20  SD 3.5 Large requires 36GB+ RAM. Generation may fail or be very slow.\n\
             \x20  Consider using --quality 4k-ultra (SDXL) instead for better performance."
        );
    }
}
