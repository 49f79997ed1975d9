//! Candle modules for the Stable Diffusion families: the CLIP text encoder, the conditional UNet
//! and the KL autoencoder, each a `Config` plus `new(cfg, vb)` whose `vb.pp(..)` paths mirror the
//! diffusers / transformers checkpoint key names, and a `forward`.
//!
//! Model code never sees paths, the hub or the command line. Every attention goes through
//! [`attention::attention`] and every normalisation through [`norm`], so that fused GPU kernels can
//! replace them later without touching model code.
#![deny(missing_docs)]

pub mod attention;
pub mod clip;
pub mod norm;
pub mod resnet;
pub mod unet;
pub mod vae;

pub use candle_core as candle;
