//! How a diffusers-named tensor maps to a single-file checkpoint's key. The component headers
//! built from these name every tensor as diffusers does, with the diffusers shape (a 1×1
//! convolution served as its linear layer) and the original byte range, so the engine's one
//! tensor reader (`loading::read_backend`) serves single files and folders alike.

/// Where a diffusers-named tensor lives in the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    /// The checkpoint's key.
    pub original: String,
    /// The shape to serve it as, where it differs from the stored one (1×1 conv → linear).
    pub reshape: Option<Vec<usize>>,
}
