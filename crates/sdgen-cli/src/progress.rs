//! Progress on stderr: a redrawn bar on a terminal, plain log lines otherwise (stdout carries only
//! results).

use std::io::{IsTerminal, Write};
use std::time::Instant;

use sdgen::pipeline::Progress;

/// Prints one log line on stderr.
pub fn log(line: &str) {
    eprintln!("{line}");
}

/// Turns pipeline progress into bars or lines.
pub struct Reporter {
    terminal: bool,
    step_start: Option<Instant>,
    drawn: bool,
}

impl Reporter {
    pub fn new() -> Self {
        Self { terminal: std::io::stderr().is_terminal(), step_start: None, drawn: false }
    }

    pub fn report(&mut self, p: Progress) {
        match p {
            Progress::StageStart(stage) => {
                self.step_start = Some(Instant::now());
                log(&format!("→ {stage}…"));
            }
            Progress::StageEnd { stage, elapsed_ms } => {
                self.finish();
                log(&format!("✓ {stage} done in {:.1}s", elapsed_ms / 1000.0));
            }
            Progress::Step { index, total } => {
                let elapsed = self.step_start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                let rate = index as f64 / elapsed.max(1e-9);
                if self.terminal {
                    let width = 30;
                    let filled = width * index / total.max(1);
                    eprint!(
                        "\r  denoising [{}{}] {index}/{total} {:.2} it/s ",
                        "#".repeat(filled),
                        "-".repeat(width - filled),
                        rate
                    );
                    let _ = std::io::stderr().flush();
                    self.drawn = true;
                } else if index == total || index % 10 == 0 {
                    log(&format!("  step {index}/{total} ({rate:.2} it/s)"));
                }
            }
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
