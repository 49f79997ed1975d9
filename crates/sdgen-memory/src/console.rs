//! The seed's console lines, byte for byte:
//!
//! ```text
//! 💾 Memory [After model load]: Process=22.8GB, System=35.4GB/64.0GB (55.3%)
//! ⚠️  WARNING: Low memory detected (25.3GB available)
//!    SD 3.5 requires 36GB+ RAM. Generation may fail or be very slow.
//!    Consider using --quality 4k-ultra (SDXL) instead for better performance.
//! ```
//!
//! "GB" means GiB (2^30 bytes), as in the seed, which printed psutil byte counts divided by
//! `1024**3`: the figures stay comparable with the seed's logs, and a "64GB" machine (64 GiB of
//! RAM) shows as `64.0GB`.

use crate::info::{memory_info, MemoryInfo};

/// Bytes in one console "GB" (a GiB; see the module docs).
pub const BYTES_PER_GB: u64 = 1 << 30;

/// `bytes` in console GB (GiB), unrounded.
pub fn bytes_to_gb(bytes: u64) -> f64 {
    bytes as f64 / BYTES_PER_GB as f64
}

/// `bytes` as the seed prints them: GiB with one decimal and the unit, e.g. `22.8GB`.
pub fn format_gb(bytes: u64) -> String {
    let gb = bytes_to_gb(bytes);
    // Below 0.1 GB one decimal says nothing (a 50 MB process reads "0.0GB"): two, as the seed's
    // format allows.
    if bytes > 0 && gb < 0.095 {
        format!("{gb:.2}GB")
    } else {
        format!("{gb:.1}GB")
    }
}

/// A requirement as the seed words it: whole GiB without decimals (`36GB`), else one decimal.
fn format_gb_requirement(bytes: u64) -> String {
    if bytes.is_multiple_of(BYTES_PER_GB) {
        format!("{}GB", bytes / BYTES_PER_GB)
    } else {
        format_gb(bytes)
    }
}

/// The seed's memory line for a snapshot, e.g.
/// `💾 Memory [After model load]: Process=22.8GB, System=35.4GB/64.0GB (55.3%)`, plus
/// `, GPU=3.1GB/80.0GB` (used/total) when the snapshot has GPU figures. An empty label drops the
/// brackets: `💾 Memory: Process=…`.
pub fn format_memory_line(label: &str, info: &MemoryInfo) -> String {
    let head = if label.is_empty() { "💾 Memory:".to_string() } else { format!("💾 Memory [{label}]:") };
    let mut line = format!(
        "{head} Process={}, System={}/{} ({:.1}%)",
        format_gb(info.process_rss_bytes),
        format_gb(info.system_used_bytes),
        format_gb(info.system_total_bytes),
        info.system_percent,
    );
    if let Some(gpu) = &info.gpu {
        line.push_str(&format!(", GPU={}/{}", format_gb(gpu.used_bytes), format_gb(gpu.total_bytes)));
    }
    line
}

/// Takes a snapshot ([`memory_info`]), prints its line to stderr (stdout carries only results)
/// and returns it, so callers can record what they printed.
pub fn log_memory_status(label: &str) -> MemoryInfo {
    let info = memory_info();
    eprintln!("{}", format_memory_line(label, &info));
    info
}

/// The seed's low-memory warning (three lines, no trailing newline; two without a suggestion):
///
/// ```text
/// ⚠️  WARNING: Low memory detected (25.3GB available)
///    SD 3.5 requires 36GB+ RAM. Generation may fail or be very slow.
///    Consider using --quality 4k-ultra (SDXL) instead for better performance.
/// ```
pub fn format_low_memory_warning(
    available_bytes: u64,
    model_display_name: &str,
    needs_bytes: u64,
    suggestion: Option<&str>,
) -> String {
    let mut text = format!(
        "⚠️  WARNING: Low memory detected ({} available)\n   {model_display_name} requires {}+ RAM. \
         Generation may fail or be very slow.",
        format_gb(available_bytes),
        format_gb_requirement(needs_bytes),
    );
    if let Some(suggestion) = suggestion {
        text.push_str(&format!("\n   Consider using {suggestion} instead for better performance."));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::info::GpuMemory;

    /// GiB with one decimal → bytes (rounded to the byte), for readable fixtures.
    fn gib(x: f64) -> u64 {
        (x * BYTES_PER_GB as f64).round() as u64
    }

    fn seed_example() -> MemoryInfo {
        MemoryInfo {
            process_rss_bytes: gib(22.8),
            process_vms_bytes: gib(400.0),
            system_used_bytes: gib(35.4),
            system_available_bytes: gib(64.0) - gib(35.4),
            system_total_bytes: gib(64.0),
            system_percent: 55.3125,
            gpu: None,
        }
    }

    #[test]
    fn memory_line_matches_the_seed_exactly() {
        assert_eq!(
            format_memory_line("After model load", &seed_example()),
            "💾 Memory [After model load]: Process=22.8GB, System=35.4GB/64.0GB (55.3%)"
        );
    }

    #[test]
    fn memory_line_with_gpu_and_without_label() {
        let info = MemoryInfo {
            gpu: Some(GpuMemory { used_bytes: gib(3.1), free_bytes: gib(76.9), total_bytes: gib(80.0) }),
            ..seed_example()
        };
        assert_eq!(
            format_memory_line("Startup", &info),
            "💾 Memory [Startup]: Process=22.8GB, System=35.4GB/64.0GB (55.3%), GPU=3.1GB/80.0GB"
        );
        assert_eq!(
            format_memory_line("", &info),
            "💾 Memory: Process=22.8GB, System=35.4GB/64.0GB (55.3%), GPU=3.1GB/80.0GB"
        );
    }

    #[test]
    fn rounding_agrees_with_python_format() {
        // Python: f"{2.25:.1f}" == "2.2", f"{2.35:.1f}" == "2.4" (2.35 is stored as 2.35000…01),
        // f"{0.05:.1f}" == "0.1", f"{1023/1024:.1f}" == "1.0": both round the exact binary value,
        // ties to even.
        assert_eq!(format_gb(gib(2.25)), "2.2GB");
        assert_eq!(format!("{:.1}", 2.35_f64), "2.4");
        assert_eq!(format!("{:.1}", 0.05_f64), "0.1");
        assert_eq!(format_gb(1023 << 20), "1.0GB");
        assert_eq!(format_gb(0), "0.0GB");
        assert_eq!(format_gb(50 << 20), "0.05GB");
        assert_eq!(format_gb(5 << 20), "0.00GB");
        assert_eq!(format_gb(100 << 20), "0.1GB");
    }

    #[test]
    fn low_memory_warning_matches_the_seed_exactly() {
        assert_eq!(
            format_low_memory_warning(gib(25.3), "SD 3.5", 36 * BYTES_PER_GB, Some("--quality 4k-ultra (SDXL)")),
            "⚠️  WARNING: Low memory detected (25.3GB available)\n\
             \x20  SD 3.5 requires 36GB+ RAM. Generation may fail or be very slow.\n\
             \x20  Consider using --quality 4k-ultra (SDXL) instead for better performance."
        );
        assert_eq!(
            format_low_memory_warning(gib(6.0), "SD 1.5", gib(7.5), None),
            "⚠️  WARNING: Low memory detected (6.0GB available)\n\
             \x20  SD 1.5 requires 7.5GB+ RAM. Generation may fail or be very slow."
        );
    }
}
