//! The plan as the console prints it: a short aligned table.
//!
//! ```text
//! Memory plan: SD 1.5, 768×768, 4 images in one batch, f32 on CPU, mode auto
//! Budget 8.0GB (--max-memory), 7.2GB usable after the 10% safety margin
//! stage         runs on  resident      weights  activations   peak  options
//! text_encoder  CPU      text_encoder    469MB         16MB  485MB  -
//! denoise       CPU      unet            3.2GB        3.6GB  6.8GB  attention slicing (4)
//! decode        CPU      vae_decoder     189MB        3.1GB  3.3GB  VAE slicing
//! Verdict: fits with slower options (attention slicing (4))
//! ```
//!
//! Sizes are the console's: GB are GiB, as the seed printed them; below 1000 MB, whole MB (MiB).

use std::fmt;

use super::planner::{Placement, Plan, Verdict};
use super::request::DeviceKind;
use crate::console::BYTES_PER_GB;

/// `bytes` for tables and messages: `1.6GB` (GiB, one decimal) from 1000 MiB up, else `235MB`
/// (whole MiB).
pub fn format_bytes(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib.round() >= 1000.0 {
        format!("{:.1}GB", bytes as f64 / BYTES_PER_GB as f64)
    } else {
        format!("{mib:.0}MB")
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let images = if self.n_images == 1 {
            "1 image".to_string()
        } else if self.batch_count == 1 {
            format!("{} images in one batch", self.n_images)
        } else if self.batch_count * self.images_per_batch == self.n_images {
            format!("{} images in {} batches of {}", self.n_images, self.batch_count, self.images_per_batch)
        } else {
            let last = self.n_images - (self.batch_count - 1) * self.images_per_batch;
            format!(
                "{} images in {} batches ({} of {}, the last of {last})",
                self.n_images,
                self.batch_count,
                self.batch_count - 1,
                self.images_per_batch
            )
        };
        let kind = if self.img2img { "img2img, " } else { "" };
        writeln!(
            f,
            "Memory plan: {}, {kind}{}×{}, {images}, {} on {}, mode {}",
            self.family,
            self.width,
            self.height,
            self.precision,
            self.device.label(),
            self.mode
        )?;
        write!(
            f,
            "Budget {} ({}), {} usable after the {:.0}% safety margin",
            format_bytes(self.budget_bytes),
            self.budget_source.label(),
            format_bytes(self.usable_bytes),
            self.safety_margin * 100.0
        )?;
        if self.baseline_bytes > 0 {
            let what = match self.device {
                DeviceKind::DiscreteGpu => "kept for the CUDA runtime",
                _ => "in use already",
            };
            write!(f, ", {} of it {what}", format_bytes(self.baseline_bytes))?;
        }
        writeln!(f)?;

        let header = ["stage", "runs on", "resident", "weights", "activations", "peak", "options"];
        let rows: Vec<[String; 7]> = self
            .stages
            .iter()
            .map(|s| {
                let mut options = s.options.describe();
                if let Some(t) = s.denoise_tiles {
                    options.push(format!("MultiDiffusion tiles ({}px, overlap {}px)", t.tile_px, t.overlap_px));
                }
                if !s.fits {
                    options.push("over budget".into());
                }
                [
                    s.stage.clone(),
                    match s.placement {
                        Placement::Device => self.device.label().split(' ').next().unwrap_or("").to_string(),
                        Placement::Host => "CPU".to_string(),
                    },
                    s.components.join("+"),
                    format_bytes(s.weight_bytes),
                    format_bytes(s.activation_bytes),
                    format_bytes(s.peak_bytes),
                    if options.is_empty() { "-".to_string() } else { options.join(", ") },
                ]
            })
            .collect();
        let mut width = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in width.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: [&str; 7]| -> fmt::Result {
            for (i, cell) in cells.iter().enumerate() {
                let pad = width[i] - cell.chars().count();
                match i {
                    // Byte columns right-aligned; the last column unpadded.
                    3..=5 => write!(f, "{}{cell}  ", " ".repeat(pad))?,
                    6 => writeln!(f, "{cell}")?,
                    _ => write!(f, "{cell}{}  ", " ".repeat(pad))?,
                }
            }
            Ok(())
        };
        line(f, header)?;
        for row in &rows {
            line(f, [&row[0], &row[1], &row[2], &row[3], &row[4], &row[5], &row[6]])?;
        }
        if let Some(q) = &self.quantised {
            writeln!(f, "Weights: {}", q.describe())?;
        }
        match self.verdict {
            Verdict::Fits if self.slower_options().is_empty() => write!(f, "Verdict: fits"),
            // Low mode takes slower options on purpose.
            Verdict::Fits => write!(f, "Verdict: fits (at full speed too; mode {} chose the leanest plan)", self.mode),
            Verdict::FitsWithSlowerOptions if self.slower_options().is_empty() => {
                write!(f, "Verdict: fits; the fastest plan would need slower options")
            }
            Verdict::FitsWithSlowerOptions => {
                write!(f, "Verdict: fits with slower options ({})", self.slower_options().join(", "))
            }
            Verdict::DoesNotFit => write!(f, "Verdict: does not fit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_format_like_the_console() {
        assert_eq!(format_bytes(0), "0MB");
        assert_eq!(format_bytes(5 << 20), "5MB");
        assert_eq!(format_bytes(999 << 20), "999MB");
        assert_eq!(format_bytes((999 << 20) + (600 << 10)), "1.0GB");
        assert_eq!(format_bytes(1 << 30), "1.0GB");
        assert_eq!(format_bytes((16 << 30) + (400 << 20)), "16.4GB");
    }
}
