//! The streaming rung of the ladder (`sdgen_models::stream` is the mechanism): after every
//! resident placement, a stage whose model has streamable blocks (a denoiser's, T5's) runs with
//! `K` of its blocks resident ([`is_resident_block`] says which) and the rest read per use, `K` as
//! large as the budget allows.
//!
//! Its peak: the resident parts, the resident blocks, the streamed blocks in flight
//! ([`blocks_in_flight`]: one where blocks are read when used, two on a discrete GPU, which builds
//! the next block while this one computes) with the read's transient, and the activations. Its cost: the bytes streamed per evaluation at the
//! device's measured read or copy bandwidth ([`STREAM_BANDWIDTH`]).

use serde::{Deserialize, Serialize};

use super::manifest::{ComponentManifest, Precision};
use super::request::DeviceKind;
use super::table::format_bytes;

/// Block streaming as chosen for a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Streaming {
    /// Blocks kept resident (spread through the forward order: [`is_resident_block`]).
    pub resident_blocks: usize,
    /// The model's streamable blocks.
    pub blocks: usize,
    /// Bytes read (CPU) or copied to the device (GPU) per evaluation.
    pub streamed_bytes: u64,
    /// The time that adds to each evaluation, at [`stream_bandwidth`].
    pub expected_ms_per_forward: u64,
}

impl Streaming {
    /// In words: `block streaming (12 of 90 blocks resident, 3.1GB streamed per evaluation, ~1.8 s
    /// more each)`.
    pub fn describe(&self) -> String {
        format!(
            "block streaming ({} of {} blocks resident, {} streamed per evaluation, ~{:.1} s more each)",
            self.resident_blocks,
            self.blocks,
            format_bytes(self.streamed_bytes),
            self.expected_ms_per_forward as f64 / 1000.0
        )
    }
}

/// A model folder component whose blocks can be streamed: its block prefixes in forward order
/// (the model's own list, e.g. `UNet2DConditionModel::stream_blocks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamableBlocks {
    /// The model folder's component (`unet`, `transformer`, `text_encoder_3`).
    pub component: String,
    /// Its blocks' tensor-name prefixes, in forward order.
    pub blocks: Vec<String>,
}

/// A measured bandwidth at which streamed weights reach the compute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamBandwidth {
    /// The device kind it applies to.
    pub device: DeviceKind,
    /// Bytes per second.
    pub bytes_per_second: f64,
    /// Where the figure comes from.
    pub source: &'static str,
}

/// What streaming reads per evaluation costs, per device.
pub const STREAM_BANDWIDTH: [StreamBandwidth; 3] = [
    StreamBandwidth {
        device: DeviceKind::Cpu,
        bytes_per_second: 1.0e9,
        source: "measured: SDXL's UNet in bf16 with every block streamed (5.1 GB read and rebuilt per evaluation, \
                 positioned reads, page cache warm) took 4.6-5.3 s more per 512² evaluation than resident \
                 (22.1/25.4 s), on the 2-core development VM at load average ~7 (2026-12-07, BENCHMARKS.md \
                 \"Block streaming on the CPU\"); a cold read of the file from its disk runs at the same 0.96 GB/s \
                 (dd iflag=direct), a warm one at 8 GB/s",
    },
    StreamBandwidth {
        device: DeviceKind::UnifiedGpu,
        bytes_per_second: 1.0e9,
        source: "the CPU's figure: unified memory reads the file the same way (not measured on a Mac)",
    },
    StreamBandwidth {
        device: DeviceKind::DiscreteGpu,
        bytes_per_second: 48.0e9,
        source: "measured: SD 3.5 Large's MMDiT in bf16 with every block streamed (15.6 GB copied per 1024² CFG \
                 evaluation from pinned memory on a copy stream, the next block copied while one computes) took \
                 323 ms per evaluation on an H100 (PCIe 5 x16): the link's rate, 48 GB/s, bounds it (2026-12-07, \
                 BENCHMARKS.md \"Block streaming on the GPU\"). The copies overlap the compute, so the time each \
                 evaluation adds is less than this estimate (137 ms there against 325 ms), never more",
    },
];

/// The bandwidth streaming gets on `device`.
pub fn stream_bandwidth(device: DeviceKind) -> f64 {
    STREAM_BANDWIDTH.iter().find(|b| b.device == device).map_or(1.0e9, |b| b.bytes_per_second)
}

/// Streamed blocks materialised at once on `device`: one where a block is read when it is used
/// (the CPU, unified memory); two on a discrete GPU, whose next block is copied while this one
/// computes (`sdgen_models::stream`).
pub fn blocks_in_flight(device: DeviceKind) -> u64 {
    match device {
        DeviceKind::DiscreteGpu => 2,
        DeviceKind::Cpu | DeviceKind::UnifiedGpu => 1,
    }
}

/// Whether block `index` (in forward order) of a model's `blocks` is among the `resident` kept
/// resident: they are spread evenly through the order, the first block among them. Block `i` of
/// `N` is resident when ⌈(i+1)K/N⌉ > ⌈iK/N⌉, which picks exactly `K`; for `K` = 1 or `N` − 1
/// these are the first `K`.
///
/// Why spread: on a discrete GPU a streamed block is copied while the two blocks before it
/// compute, with the resident ones between them (`sdgen_models::stream`). Bunched at the start,
/// the resident blocks hide the copy of one streamed block, and the streamed ones after them run
/// at the link's rate; spread, each streamed block's copy runs beside the compute of the resident
/// blocks before it. On the CPU, which reads a block when it is used, the order costs nothing.
pub fn is_resident_block(index: usize, blocks: usize, resident: usize) -> bool {
    let resident = resident.min(blocks);
    index < blocks && ((index + 1) * resident).div_ceil(blocks) > (index * resident).div_ceil(blocks)
}

/// The sizes of a stage's streamable blocks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BlockSizes {
    /// Each block's weights at the stage's precision, in forward order.
    bytes: Vec<u64>,
    /// Each block's read transient on the host: its largest tensor read into a buffer and turned
    /// into a tensor (both at once, the stored size) before it is converted.
    read_bytes: Vec<u64>,
    /// Each block's weights held quantised (GGML blocks, fp8): on a discrete GPU their uploads
    /// stay beside the arriving block's own copies until its release
    /// (`sdgen_models::stream::copy::release_with_block`).
    held_bytes: Vec<u64>,
}

impl BlockSizes {
    /// The blocks of `manifest` named `blocks`, at `precision`; `None` when it has none of them.
    pub(crate) fn of(manifest: &ComponentManifest, blocks: &[String], precision: Precision) -> Option<Self> {
        let precision = manifest.precision.unwrap_or(precision);
        let (mut bytes, mut read_bytes, mut held_bytes) = (Vec::new(), Vec::new(), Vec::new());
        for block in blocks {
            let prefix = format!("{block}.");
            let tensors = || manifest.tensors.iter().filter(|t| t.name.starts_with(&prefix));
            bytes.push(tensors().map(|t| t.bytes_at(precision)).sum());
            read_bytes.push(2 * tensors().map(|t| t.stored_bytes()).max().unwrap_or(0));
            held_bytes.push(tensors().filter(|t| t.held.is_some()).map(|t| t.bytes_at(precision)).sum());
        }
        bytes.iter().any(|&b| b > 0).then_some(Self { bytes, read_bytes, held_bytes })
    }

    /// The streamable blocks.
    pub(crate) fn count(&self) -> usize {
        self.bytes.len()
    }

    /// With `resident` blocks resident on `device` ([`is_resident_block`]): the bytes the streamed
    /// blocks take out of the stage's weights, the bytes they add back in flight, and the choice.
    pub(crate) fn split(&self, resident: usize, device: DeviceKind) -> (u64, u64, Streaming) {
        let n = self.count();
        let streamed: Vec<usize> = (0..n).filter(|&i| !is_resident_block(i, n, resident)).collect();
        let streamed_bytes: u64 = streamed.iter().map(|&i| self.bytes[i]).sum();
        let largest_of = |v: &[u64]| streamed.iter().map(|&i| v[i]).max().unwrap_or(0);
        let largest = largest_of(&self.bytes);
        // On the CPU each tensor is read on the host, next to the block; a GPU's copies are
        // made on the host, outside the device budget, but a quantised block's uploads stay on
        // the device beside the block made from them until its release.
        let read = match device {
            DeviceKind::DiscreteGpu => largest_of(&self.held_bytes),
            _ => largest_of(&self.read_bytes),
        };
        let expected_ms_per_forward = (streamed_bytes as f64 / stream_bandwidth(device) * 1e3).round() as u64;
        let choice =
            Streaming { resident_blocks: resident, blocks: self.count(), streamed_bytes, expected_ms_per_forward };
        (streamed_bytes, largest * blocks_in_flight(device) + read, choice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{StoredDType, TensorEntry};

    #[test]
    fn resident_blocks_are_spread_through_the_forward_order() {
        let pattern = |n: usize, k: usize| -> String {
            (0..n).map(|i| if is_resident_block(i, n, k) { 'R' } else { 's' }).collect()
        };
        assert_eq!(pattern(6, 0), "ssssss");
        assert_eq!(pattern(6, 1), "Rsssss");
        assert_eq!(pattern(6, 2), "RssRss");
        assert_eq!(pattern(6, 3), "RsRsRs");
        assert_eq!(pattern(6, 5), "RRRRRs");
        assert_eq!(pattern(6, 6), "RRRRRR");
        assert_eq!(pattern(6, 9), "RRRRRR");
        assert_eq!(pattern(0, 3), "");
        for n in 1..=100 {
            for k in 0..=n {
                let p = pattern(n, k);
                assert_eq!(p.matches('R').count(), k, "{n} blocks, {k} resident: {p}");
                // No run of streamed blocks is longer than an even share of them per resident one.
                let longest = p.split('R').map(str::len).max().unwrap_or(0);
                assert!(k == 0 || longest <= (n - k).div_ceil(k), "{n} blocks, {k} resident: {p}");
            }
        }
        // Out of range: not resident.
        assert!(!is_resident_block(6, 6, 6));
    }

    #[test]
    fn blocks_are_sized_from_the_manifest_by_prefix() {
        let t = |name: &str, n: usize| TensorEntry::new(name, vec![n], StoredDType::F32);
        let m = ComponentManifest::new(
            "unet",
            vec![t("conv_in.weight", 10), t("b.0.w", 100), t("b.0.v", 20), t("b.1.w", 300), t("b.10.w", 50)],
        );
        let blocks: Vec<String> = ["b.0", "b.1", "b.10"].map(String::from).to_vec();
        let sizes = BlockSizes::of(&m, &blocks, Precision::Bf16).unwrap();
        // `b.1.` does not take `b.10.`'s tensors.
        assert_eq!(sizes.bytes, [240, 600, 100]);
        assert_eq!(sizes.read_bytes, [800, 2400, 400]);
        let (out, in_flight, s) = sizes.split(1, DeviceKind::Cpu);
        assert_eq!((out, in_flight), (700, 600 + 2400));
        assert_eq!((s.resident_blocks, s.blocks, s.streamed_bytes), (1, 3, 700));
        // A GPU holds the block computing and the one arriving; its copies wait on the host.
        let (_, in_flight, _) = sizes.split(0, DeviceKind::DiscreteGpu);
        assert_eq!(in_flight, 2 * 600);
        assert!(BlockSizes::of(&m, &["x.0".to_string()], Precision::F32).is_none());
        // A block held in Q8_0 (34 bytes per 32 weights): on a GPU its uploads wait beside the
        // arriving block until its release.
        let q8 = crate::plan::Blocks { elements: 32, bytes: 34 };
        let q = ComponentManifest::new("transformer", vec![t("b.0.w", 320).held_in(Some(q8)), t("b.0.bias", 10)]);
        let sizes = BlockSizes::of(&q, &blocks[..1], Precision::Bf16).unwrap();
        assert_eq!(sizes.bytes, [340 + 20]);
        assert_eq!(sizes.split(0, DeviceKind::DiscreteGpu).1, 2 * 360 + 340);
    }
}
