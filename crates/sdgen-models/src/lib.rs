//! Candle modules for the Stable Diffusion families: the CLIP and T5 text encoders, the
//! conditional UNet and SD 3's MMDiT (both behind the [`denoiser::Denoiser`] seam the pipelines
//! call) and the KL autoencoder, each a `Config` plus `new(cfg, vb)` whose `vb.pp(..)` paths mirror the
//! diffusers / transformers checkpoint key names, and a `forward`.
//!
//! Model code never sees paths, the hub or the command line. Every attention, normalisation,
//! convolution and linear layer goes through the kernel seam [`ops`], which picks the fast CUDA
//! kernels or the reference path per device, so a faster kernel applies to every family at once.
//! The denoisers and T5 can be built with their blocks streamed ([`stream`]): resident parts and
//! K of the blocks in memory, every other block rebuilt from its weights for each use.
#![deny(missing_docs)]

pub mod clip;
pub mod denoiser;
pub mod mmdit;
pub mod ops;
pub mod resnet;
pub mod stream;
pub mod t5;
pub mod unet;
pub mod vae;

pub use candle_core as candle;
pub use ops::{attention, norm};
