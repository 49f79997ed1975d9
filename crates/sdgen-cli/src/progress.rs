//! Progress on stderr: a redrawn bar on a terminal, plain log lines otherwise (stdout carries only
//! results).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sdgen::hub::DownloadProgress;
use sdgen::pipeline::Progress;

/// `--quiet`: only warnings and errors on stderr.
static QUIET: AtomicBool = AtomicBool::new(false);

/// Turns the progress and log lines off (`--quiet`); warnings and errors still print.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// `--verbose`: every step on its own line, and what runs (kernels, memory options).
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Turns the detailed lines on (`--verbose`).
pub fn set_verbose(verbose: bool) {
    VERBOSE.store(verbose, Ordering::Relaxed);
}

/// Whether `--verbose` is on.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Prints one log line on stderr (not with `--quiet`).
pub fn log(line: &str) {
    if !quiet() {
        eprintln!("{line}");
    }
}

/// Prints a warning on stderr, `--quiet` or not.
pub fn warn(line: &str) {
    eprintln!("{line}");
}

/// The seed's memory line for `label`, now (not with `--quiet`).
pub fn memory(label: &str) {
    if !quiet() {
        sdgen_memory::log_memory_status(label);
    }
}

/// Turns pipeline progress into bars or lines.
pub struct Reporter {
    terminal: bool,
    step_start: Option<Instant>,
    drawn: bool,
    /// The last file logged as downloaded (the final report of a file may come twice).
    last_file_logged: Option<usize>,
}

impl Reporter {
    pub fn new() -> Self {
        Self { terminal: std::io::stderr().is_terminal(), step_start: None, drawn: false, last_file_logged: None }
    }

    pub fn report(&mut self, p: Progress) {
        if quiet() {
            return;
        }
        match p {
            Progress::StageStart(stage) => {
                self.step_start = Some(Instant::now());
                log(&format!("→ {stage}…"));
            }
            Progress::StageEnd { stage, elapsed_ms } => {
                self.finish();
                log(&format!("✓ {stage} done in {:.1}s", elapsed_ms / 1000.0));
            }
            Progress::Note(line) => {
                self.finish();
                log(line);
            }
            Progress::Memory { label, info } => {
                self.finish();
                log(&sdgen_memory::format_memory_line(label, info));
                // The step rate counts denoising alone, not the denoiser's load before it.
                if label == sdgen::pipeline::BEFORE_GENERATION {
                    self.step_start = Some(Instant::now());
                }
            }
            Progress::Step { index, total } => {
                let elapsed = self.step_start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                let rate = index as f64 / elapsed.max(1e-9);
                if self.terminal {
                    let width = 30;
                    let filled = width * index / total.max(1);
                    let eta = (total.saturating_sub(index)) as f64 / rate.max(1e-9);
                    eprint!(
                        "\r  denoising [{}{}] {index}/{total} {:.2} it/s, {} left ",
                        "#".repeat(filled),
                        "-".repeat(width - filled),
                        rate,
                        duration(eta)
                    );
                    let _ = std::io::stderr().flush();
                    self.drawn = true;
                } else if index == total || index % 10 == 0 || verbose() {
                    log(&format!("  step {index}/{total} ({rate:.2} it/s)"));
                }
            }
        }
    }

    /// Reports hub download progress: a byte bar on a terminal, a line per finished file otherwise.
    pub fn download(&mut self, p: &DownloadProgress) {
        if quiet() {
            return;
        }
        let done = p.file_done_bytes >= p.file_total_bytes;
        if self.terminal {
            let width = 30;
            let filled = (width as u64 * p.done_bytes).checked_div(p.total_bytes).map_or(width, |v| v as usize);
            eprint!(
                "\r  downloading {} [{}{}] {:.1}/{:.1} MB, file {}/{} {} ",
                p.repo,
                "#".repeat(filled.min(width)),
                "-".repeat(width - filled.min(width)),
                p.done_bytes as f64 / 1e6,
                p.total_bytes as f64 / 1e6,
                p.file_index + 1,
                p.file_count,
                p.file
            );
            let _ = std::io::stderr().flush();
            self.drawn = true;
        } else if done && self.last_file_logged != Some(p.file_index) {
            self.last_file_logged = Some(p.file_index);
            log(&format!(
                "  downloaded {} ({:.1} MB; {}/{} files)",
                p.file,
                p.file_total_bytes as f64 / 1e6,
                p.file_index + 1,
                p.file_count
            ));
        }
    }

    /// Ends a bar line, if one is drawn.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// `42s`, `3m05s`, `1h02m`: a remaining time at the precision worth reading.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_naturally() {
        assert_eq!(super::duration(0.4), "0s");
        assert_eq!(super::duration(42.0), "42s");
        assert_eq!(super::duration(185.0), "3m05s");
        assert_eq!(super::duration(3720.0), "1h02m");
    }
}
