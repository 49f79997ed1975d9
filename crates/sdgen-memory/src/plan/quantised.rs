//! The quantised rung: after streaming, the planner may hold the model's weights quantised (what
//! `--weights q8|fp8|q4` loads), each way again with every resident and streaming option. It
//! changes the image, so it is never taken while a full-precision plan fits (in any mode), and
//! never when the user chose the weights (`--weights`) or the file is quantised already: the
//! engine then offers no [`QuantisedWeights`].
//!
//! The order is [`QUANTISED_KINDS`]'s, best image first: Q8_0 (near-lossless), then fp8 (E4M3
//! with a per-tensor scale: 6% smaller than Q8_0 and about 3.5× its error), then Q4 (a quarter
//! of bf16, an order coarser). Auto and balanced take the first that fits; low takes the leanest
//! that fits; fast never quantises (dequantising costs time on the CPU). Each kind's expected slowdown is its dequantisation per evaluation (the CPU and
//! fp8 multiply a transient dense copy of each weight; CUDA multiplies GGML blocks in place).
//!
//! The transient: a layer whose weight is held quantised dequantises it for its product, so a
//! stage holds, beside its activations, the largest such weight dense ([`dequantise_bytes`]).

use serde::{Deserialize, Serialize};

use super::manifest::{Blocks, ComponentManifest, ModelManifest, Precision};
use super::request::DeviceKind;

/// One way of holding the weights quantised, with what it costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantisedKind {
    /// `--weights`'s name.
    pub name: &'static str,
    /// What it does to the image, in words.
    pub quality: &'static str,
    /// Dequantising on the CPU, nanoseconds per weight (on 2 cores: the development VM).
    pub cpu_ns_per_weight: f64,
    /// Dequantising on a GPU, nanoseconds per weight: a whole SD 3.5 Large MMDiT evaluation
    /// quantised against bf16, over its ~8.0 G quantised weights (H100, BENCHMARKS.md session 9:
    /// Q8_0 +61 ms, fp8 +59 ms; Q4_K's layers dequantise as fast as Q8_0's, `gpu_ops`).
    pub gpu_ns_per_weight: f64,
}

/// The kinds, best image first. Errors: the tiny SD 3.5 MMDiT's forward against its 16/32-bit
/// weights (relative L2; `crates/sdgen/tests/gguf.rs`, `fp8.rs`), beside the published
/// expectation (city96's and ComfyUI's: Q8_0 indistinguishable, fp8 close, Q4 visibly softer).
/// Speeds: dequantising alone at SD 3.5 Medium's shapes (`sdgen-bench --component quantised`,
/// BENCHMARKS.md "Quantised and fp8 products", 2 loaded cores, 2026-12-07): Q8_0 0.6–1.1 ns a
/// weight, Q4_K 0.4–0.5, fp8 (a table lookup) 0.26–0.32; the product itself runs at the dense
/// layer's speed, within this VM's noise. On a GPU every kind dequantises for its products, at
/// memory bandwidth: measured over a whole MMDiT ([`QuantisedKind::gpu_ns_per_weight`]).
pub const QUANTISED_KINDS: [QuantisedKind; 3] = [
    QuantisedKind {
        name: "q8",
        quality: "Q8_0, near-lossless (tiny MMDiT 8.0e-3 relative L2)",
        cpu_ns_per_weight: 1.1,
        gpu_ns_per_weight: 0.008,
    },
    QuantisedKind {
        name: "fp8",
        quality: "fp8 E4M3 with per-tensor scales, close (tiny MMDiT 2.9e-2 relative L2)",
        cpu_ns_per_weight: 0.32,
        gpu_ns_per_weight: 0.008,
    },
    QuantisedKind {
        name: "q4",
        quality: "Q4_K/Q4_0, coarser (tiny MMDiT 1.2e-1 relative L2)",
        cpu_ns_per_weight: 0.5,
        gpu_ns_per_weight: 0.008,
    },
];

impl QuantisedKind {
    /// The kind `--weights` calls `name`.
    pub fn by_name(name: &str) -> Option<&'static QuantisedKind> {
        QUANTISED_KINDS.iter().find(|k| k.name == name)
    }
}

/// The model's manifest as one kind would hold it, offered by the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantisedWeights {
    /// The kind ([`QUANTISED_KINDS`]).
    pub kind: &'static QuantisedKind,
    /// The model's tensors, those it quantises [`held`](super::TensorEntry::held) so.
    pub manifest: ModelManifest,
}

/// The quantised rung as chosen, recorded in the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantised {
    /// `--weights`'s name of the kind.
    pub weights: String,
    /// What it does to the image.
    pub quality: String,
    /// The time dequantising adds to each evaluation of the denoiser.
    pub expected_ms_per_forward: u64,
}

impl Quantised {
    /// The choice for `kind` on `device`, whose denoiser holds `quantised_weights` quantised.
    pub(crate) fn new(kind: &QuantisedKind, device: DeviceKind, quantised_weights: u64) -> Self {
        let ns = match device {
            DeviceKind::Cpu => kind.cpu_ns_per_weight,
            DeviceKind::DiscreteGpu | DeviceKind::UnifiedGpu => kind.gpu_ns_per_weight,
        };
        Self {
            weights: kind.name.to_string(),
            quality: kind.quality.to_string(),
            expected_ms_per_forward: (quantised_weights as f64 * ns / 1e6).round() as u64,
        }
    }

    /// In words: `weights quantised to q8 (Q8_0, near-lossless …; ~0.3 s more per evaluation)`.
    pub fn describe(&self) -> String {
        format!(
            "weights quantised to {} ({}; ~{:.1} s more per evaluation)",
            self.weights,
            self.quality,
            self.expected_ms_per_forward as f64 / 1000.0
        )
    }
}

/// Weights a component holds quantised (element count).
pub(crate) fn quantised_weights(manifest: &ComponentManifest) -> u64 {
    manifest.tensors.iter().filter(|t| t.held.is_some()).map(|t| t.element_count()).sum()
}

/// Bytes a layer's product holds beyond its weight while it dequantises it: per weight, GGML
/// blocks are dequantised to f32 and then converted to the compute precision (both held at once;
/// no conversion in f32), on the CPU and on a GPU alike (`sdgen_models::ops::linear::
/// quantised_path`: a GPU's products of a few rows multiply the blocks in place, but the largest
/// layer may be a many-row one); fp8 (a one-element unit) is looked up straight into the compute
/// precision on the CPU, cast and then scaled on a GPU. Measured on the CPU beyond the dense
/// layer's own peak (`crates/sdgen/tests/activation_peaks.rs` `quantised_product_transients`,
/// SD 3.5 Large's 35.5 M-weight adaLN layer, 2026-12-07): f32 —
/// Q8_0 4.0, fp8 4.0 bytes a weight; bf16 — Q8_0 6.0, fp8 2.0 (the dense bf16 layer itself holds
/// 2.0, its packed copy, as the quantised ones do on top).
pub(crate) fn dequantise_bytes(held: Blocks, precision: Precision, device: DeviceKind) -> u64 {
    let p = precision.size_bytes();
    let fp8 = held.elements == 1;
    match (device, fp8) {
        (DeviceKind::Cpu, true) => p,
        (_, true) => 2 * p,
        (_, false) if precision == Precision::F32 => 4,
        (_, false) => 4 + p,
    }
}

/// The most any of `components`' quantised weights holds while it is dequantised for a product.
pub(crate) fn transient_bytes(components: &[&ComponentManifest], precision: Precision, device: DeviceKind) -> u64 {
    let tensors = components.iter().flat_map(|c| c.tensors.iter());
    let per = tensors.filter_map(|t| Some(t.element_count() * dequantise_bytes(t.held?, precision, device)));
    per.max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{StoredDType, TensorEntry};

    #[test]
    fn the_transient_is_the_largest_quantised_weight_dequantised() {
        let q8 = Blocks { elements: 32, bytes: 34 };
        let fp8 = Blocks { elements: 1, bytes: 1 };
        let m = ComponentManifest::new(
            "transformer",
            vec![
                TensorEntry::new("a.weight", vec![2432, 9728], StoredDType::BF16).held_in(Some(q8)),
                TensorEntry::new("b.weight", vec![2432, 2432], StoredDType::BF16).held_in(Some(q8)),
                TensorEntry::new("pos_embed", vec![1, 36864, 2432], StoredDType::BF16),
            ],
        );
        let n = 2432 * 9728;
        assert_eq!(transient_bytes(&[&m], Precision::Bf16, DeviceKind::Cpu), n * 6);
        assert_eq!(transient_bytes(&[&m], Precision::F32, DeviceKind::Cpu), n * 4);
        assert_eq!(transient_bytes(&[&m], Precision::Bf16, DeviceKind::DiscreteGpu), n * 6);
        assert_eq!(dequantise_bytes(fp8, Precision::Bf16, DeviceKind::Cpu), 2);
        assert_eq!(dequantise_bytes(fp8, Precision::Bf16, DeviceKind::DiscreteGpu), 4);
        assert_eq!(quantised_weights(&m), n + 2432 * 2432);
        let q = Quantised::new(QuantisedKind::by_name("q8").unwrap(), DeviceKind::Cpu, 8_000_000_000);
        assert_eq!(q.expected_ms_per_forward, 8800);
        assert!(q.describe().starts_with("weights quantised to q8 (Q8_0"), "{}", q.describe());
        assert_eq!(QUANTISED_KINDS.map(|k| k.name), ["q8", "fp8", "q4"]);
    }
}
