//! Prompts as AUTOMATIC1111's web UI reads them ([`PromptStyle::A1111`]): `(word)`, `(word:1.2)`,
//! `[word]`, `\(` escapes and `BREAK` (`parse.rs`, after `modules/prompt_parser.py`); any length,
//! in chunks of 75 tokens each framed as CLIP's 77, encoded one by one and concatenated along the
//! tokens, the weights multiplied into each chunk's hidden states and its mean restored
//! (`chunks.rs`, after `modules/sd_hijack_clip.py` and `modules/sd_emphasis.py`).
//!
//! A plain prompt that fits in 75 tokens gives the very ids diffusers gives (one chunk, no
//! weights), so it goes diffusers' way under either style and the parity with diffusers holds.
//! [`PromptStyle::Diffusers`] reads every prompt as diffusers does: brackets as text, cut at 77
//! tokens with a warning naming what was dropped.

mod chunks;
mod parse;

pub use chunks::{apply_emphasis, chunk_tokens, ChunkFrame, PromptChunk, TokenPiece, CHUNK_TOKENS, COMMA_BACKTRACK};
pub use parse::{has_attention_syntax, parse_prompt_attention, Piece};

use crate::tokenizer::ClipTokenizer;
use crate::Result;

/// How prompts are read (`--prompt-style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum PromptStyle {
    /// A1111's syntax and chunking, for the prompts that need it (weights, `BREAK`, over 75
    /// tokens); the default.
    #[default]
    A1111,
    /// diffusers' `encode_prompt`: the text as is, cut at 77 tokens.
    Diffusers,
}

/// The text-encoder options of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PromptOptions {
    /// How prompts are read.
    pub style: PromptStyle,
    /// A1111's "Clip skip" for SD 1.5 (1 = the last layer, A1111's default; N = the hidden state
    /// N layers from the end, then the final layer norm). `None` = the family's own.
    pub clip_skip: Option<usize>,
}

/// A prompt's chunks as A1111 makes them with `tokenizer`.
pub fn a1111_chunks(tokenizer: &ClipTokenizer, text: &str) -> Result<Vec<PromptChunk>> {
    let mut pieces = Vec::new();
    for piece in parse_prompt_attention(text) {
        pieces.push(match piece {
            Piece::Break => TokenPiece::Break,
            // Each run is tokenized on its own, as A1111 tokenizes the parsed texts as a batch.
            Piece::Text(t, w) => TokenPiece::Tokens(tokenizer.content_ids(&t)?, w),
        });
    }
    Ok(chunk_tokens(&pieces, tokenizer.chunk_frame()?))
}

/// Whether `texts` (a prompt and its negative) need A1111's reading under `style`: some text has
/// its syntax or more than 75 tokens.
pub fn needs_a1111(tokenizer: &ClipTokenizer, style: PromptStyle, texts: &[String]) -> Result<bool> {
    if style == PromptStyle::Diffusers {
        return Ok(false);
    }
    for t in texts {
        if has_attention_syntax(t) || tokenizer.content_ids(t)?.len() > CHUNK_TOKENS {
            return Ok(true);
        }
    }
    Ok(false)
}
