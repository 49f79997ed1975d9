//! The SD-Generate engine: model loading and family detection, tokenizers, schedulers, the
//! PyTorch-compatible noise generator, pipelines (encode → denoise → decode) and outputs.
#![deny(missing_docs)]

pub mod device_memory;
pub mod error;
pub mod hub;
pub mod image_io;
pub mod loading;
pub mod output;
pub mod pipeline;
pub mod planning;
pub mod rng;
pub mod schedulers;
pub mod tokenizer;

pub use candle_core as candle;
pub use error::{Error, Result};
