//! The SD 3.5 folders `sdgen-bench` writes, less the weights: the real repositories' configs
//! (stabilityai/stable-diffusion-3.5-large and -medium, the engine's bundled copies for
//! single-file checkpoints, `sdgen/src/loading/single_file/sd35/`) and CLIP tokenizers (SDXL's,
//! the same vocab and merges, `tokenizer_2` padding with `!`). The T5 tokenizer is a stand-in:
//! the real `spiece.model` cannot be fetched here, and the tiny one (`testdata/tiny-t5`) gives
//! ids of the same length, which is all speed and memory depend on.

use sdgen::loading::single_file::defaults::BundledFile;

macro_rules! config {
    ($path:expr) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sdgen/src/loading/single_file/sd35/", $path))
    };
}
macro_rules! testdata {
    ($path:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/", $path))
    };
}
macro_rules! sdxl {
    ($path:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sdgen/src/loading/single_file/sdxl/", $path))
    };
}

/// An SD 3.5 folder: its own `model_index.json` and transformer config, then what both sizes
/// share (encoders, tokenizers, VAE, scheduler).
macro_rules! sd35 {
    ($size:literal) => {
        [
            ("model_index.json", config!(concat!($size, "/model_index.json"))),
            ("transformer/config.json", config!(concat!($size, "/transformer/config.json"))),
            ("scheduler/scheduler_config.json", config!("scheduler/scheduler_config.json")),
            ("text_encoder/config.json", config!("text_encoder/config.json")),
            ("text_encoder_2/config.json", config!("text_encoder_2/config.json")),
            ("text_encoder_3/config.json", config!("text_encoder_3/config.json")),
            ("tokenizer/merges.txt", testdata!("clip-tokenizer/merges.txt")),
            ("tokenizer/special_tokens_map.json", sdxl!("tokenizer/special_tokens_map.json")),
            ("tokenizer/tokenizer_config.json", sdxl!("tokenizer/tokenizer_config.json")),
            ("tokenizer/vocab.json", testdata!("clip-tokenizer/vocab.json")),
            ("tokenizer_2/merges.txt", testdata!("clip-tokenizer/merges.txt")),
            ("tokenizer_2/special_tokens_map.json", sdxl!("tokenizer_2/special_tokens_map.json")),
            ("tokenizer_2/tokenizer_config.json", sdxl!("tokenizer_2/tokenizer_config.json")),
            ("tokenizer_2/vocab.json", testdata!("clip-tokenizer/vocab.json")),
            ("tokenizer_3/special_tokens_map.json", testdata!("tiny-t5/tokenizer_3/special_tokens_map.json")),
            ("tokenizer_3/spiece.model", testdata!("tiny-t5/tokenizer_3/spiece.model")),
            ("tokenizer_3/tokenizer.json", testdata!("tiny-t5/tokenizer_3/tokenizer.json")),
            ("tokenizer_3/tokenizer_config.json", testdata!("tiny-t5/tokenizer_3/tokenizer_config.json")),
            ("vae/config.json", config!("vae/config.json")),
        ]
    };
}

/// SD 3.5 Large's folder (8.1B MMDiT).
pub static SD35_LARGE: [BundledFile; 19] = sd35!("large");

/// SD 3.5 Medium's folder (2.5B MMDiT-X).
pub static SD35_MEDIUM: [BundledFile; 19] = sd35!("medium");
