//! The engine's kernel limits that the planner's formulas model, defined once: `sdgen_models`'
//! kernels obey them and the planner caps its estimates by them, so the two cannot drift apart.

/// The most attention score elements one call materialises on the CPU (2^30, half of what 32-bit
/// kernel indexing allows); past it the engine scores the query rows in chunks.
pub const MAX_SCORE_ELEMENTS_CPU: usize = 1 << 30;

/// The same on a GPU: 2^26. Large transient buffers fragment CUDA's stream-ordered pool: with
/// whole-layer score matrices the UNet's measured peak varied between identical runs by one score
/// buffer (1 GB at 512², 4 GB at 768²), which no budget can plan for. Chunks this size keep the
/// variation small, the peak far lower, and the matrix products still large.
pub const MAX_SCORE_ELEMENTS_GPU: usize = 1 << 26;

/// The most elements of the column (im2col) buffer one convolution call builds on the CPU: half of
/// the 2^31 that 32-bit kernel indexing allows (the VAE decoder's 256-channel convolutions at
/// 1024² would need 2.4 G); past it the batch is convolved an image at a time, then in bands.
pub const MAX_CONV_COLUMN_ELEMENTS_CPU: usize = 1 << 30;

/// The same on a GPU running the im2col convolution: 2^28 (1 GiB at f32). It builds the column
/// whole, and transient buffers of several GB fragment the memory pool (the VAE decoder's peak at
/// 768² varied between identical runs by 2 GB with 4 GiB bands).
pub const MAX_CONV_COLUMN_ELEMENTS_GPU: usize = 1 << 28;
