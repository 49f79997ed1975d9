//! The SD-Generate engine: model loading and family detection, tokenizers, schedulers, the
//! PyTorch-compatible noise generator, pipelines (encode → denoise → decode) and outputs.
#![deny(missing_docs)]

pub mod device_memory;
pub mod engine;
pub mod error;
pub mod hub;
pub mod image_io;
pub mod loading;
pub mod output;
pub mod pipeline;
pub mod planning;
pub mod presets;
pub mod prompt;
pub mod rng;
pub mod schedulers;
pub mod tokenizer;

pub use candle_core as candle;

/// The kernel seam's process-wide switch and what a device runs (see `sdgen_models::ops`).
pub mod kernels {
    pub use sdgen_models::ops::{
        cpu_threads, fast_kernels_enabled, kernel_summary, set_cpu_threads, set_fast_kernels, CUDA_FAST_BY_DEFAULT,
        FAST_KERNELS_ENV, NO_FAST_KERNELS_ENV,
    };
}
pub use error::{Error, Result};
