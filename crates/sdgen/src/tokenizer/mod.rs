//! The prompt tokenizers: CLIP's byte-level BPE tokenizer, as the Stable Diffusion pipelines
//! tokenize a prompt (below), and T5's sentencepiece tokenizer, SD 3's third ([`T5Tokenizer`],
//! `t5.rs`).
//!
//! diffusers calls the folder's `CLIPTokenizer` as `padding="max_length", max_length=77,
//! truncation=True`: `<|startoftext|>`, the prompt's tokens (at most 75), `<|endoftext|>`, then the
//! pad token. What "the prompt's tokens" are depends on the transformers version, so there are two
//! modes ([`TokenizerMode`]):
//!
//! - [`TokenizerMode::Transformers5`], the default, because the parity target is diffusers on the
//!   pinned stack (transformers 5, see `tools/reference/requirements.txt`): from transformers 5 on,
//!   `CLIPTokenizer` *is* the tokenizers-backed class (4.x's `CLIPTokenizerFast`), and there is no
//!   slow one any more. Its pipeline (`fast.rs`): added tokens split out (case-sensitively, on the
//!   raw text, or on the normalised text for `normalized` ones); NFC, `\s+` → one space,
//!   per-character lower-casing; CLIP's regex split, then the byte-level pre-tokenizer (which splits
//!   again with GPT-2's regex) and BPE with `</w>`.
//! - [`TokenizerMode::Slow`]: transformers 4.x's *slow* `CLIPTokenizer` without `ftfy` (its
//!   `BasicTokenizer` path, `slow.rs`): added tokens split out of the raw text, control characters
//!   dropped, spaces around CJK ideographs, NFC, Python `str.split()` and `str.lower()` per word,
//!   CLIP's regex compiled case-insensitively, byte-level BPE with `</w>`.
//!
//! The two agree on plain prompts (the tiny-model parity tests' among them) and differ on 76–79 of
//! the 321 prompts of `testdata/reference/tokens.json`, depending on the folder. Transformers5
//! - keeps control and format characters (NUL, ESC, `\x1c`–`\x1f`, U+200B, U+FEFF, U+FFFD,
//!   unassigned and private-use code points) as byte tokens, where Slow drops them (so
//!   `<|endo\0ftext|>` is plain text, where Slow gives the eos id);
//! - takes `\x0b`, `\x0c` and U+0085 for whitespace (Slow drops them, gluing the words around);
//! - tokenizes a run of CJK ideographs as one word (Slow: one word per ideograph);
//! - lower-cases per character (`ΟΔΟΣ` → `οδοσ`; Slow's `str.lower()` gives a final `ς`);
//! - keeps U+0345 and matches contractions case-sensitively (Slow's case-insensitive regex drops
//!   U+0345 and reads `'ſ` as `'s`);
//! - matches an added token that is not `normalized` only as written: in SD 1.5's folder that is
//!   `<|endoftext|>`, so `<|ENDOFTEXT|>` is plain text there (`<|`, `endoftext`, `|>`), where Slow
//!   gives the eos id.
//!
//! transformers 4.x's `CLIPTokenizerFast` equals Transformers5 but for that last point: it
//! registers SD 1.5's `<|endoftext|>` as `normalized` (transformers 5 lets the folder's plain-string
//! `pad_token` redefine it). `tokens.json` records all three; see `tools/reference/make_tokens.py`.
//!
//! A folder holds the vocabulary and merges as the hub's `vocab.json` and `merges.txt`, or as the
//! `tokenizer.json` that transformers 5's `save_pretrained` writes instead (with its added tokens;
//! `tokenizer_config.json` beside it). Transformers5 prefers `tokenizer.json` where both are
//! present, Slow the two files, as their references do (`files.rs`). `testdata/tokenizer-json`
//! holds such saves; `json_tests.rs` checks them against both references.
//!
//! Unicode tables are Rust's (regex: Unicode 16.0). A sweep of every code point (the ignored test
//! `sweep_all_code_points`) finds Transformers5 equal to transformers 5.24 / tokenizers 0.23 on all
//! of them, and Slow differing from Python 3.11's transformers 4.57 only on code points assigned in
//! Unicode 15.0–16.0 (see `slow.rs`).

mod fast;
mod files;
#[cfg(test)]
mod json_tests;
mod slow;
mod t5;
#[cfg(test)]
mod tests;

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};
use files::{ModelSource, TokenizerJson};
pub use t5::{T5Tokenizer, T5_DEFAULT_MAX_LENGTH, T5_MAX_LENGTH};

/// Which transformers `CLIPTokenizer` to reproduce (see the module doc for where they differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenizerMode {
    /// transformers 5's `CLIPTokenizer`, backed by the `tokenizers` library (= transformers 4.x's
    /// `CLIPTokenizerFast` but for how added tokens are registered): what diffusers on the pinned
    /// stack loads.
    #[default]
    Transformers5,
    /// transformers 4.x's slow, pure-Python `CLIPTokenizer` without `ftfy` installed.
    Slow,
}

/// A prompt's token ids, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Exactly `max_length` ids: for CLIP `<|startoftext|>`, the kept tokens, `<|endoftext|>`,
    /// then padding; for T5 the kept tokens, `</s>`, then padding.
    pub ids: Vec<u32>,
    /// How many of the prompt's tokens did not fit and were cut (0 when it fits).
    pub dropped_tokens: usize,
}

/// The ids that frame and pad a sequence, as a mode resolves them from the folder's configs.
#[derive(Debug, Clone, Copy)]
struct FrameIds {
    bos: u32,
    eos: u32,
    pad: u32,
}

/// The mode's tokenizer proper: the prompt's tokens, without bos, eos or padding.
enum Engine {
    Slow(slow::SlowClip),
    Fast(fast::FastClip),
}

/// The CLIP tokenizer of a hub `tokenizer/` folder.
pub struct ClipTokenizer {
    mode: TokenizerMode,
    engine: Engine,
    vocab_size: usize,
    max_length: usize,
    frame: FrameIds,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("mode", &self.mode)
            .field("vocab_size", &self.vocab_size)
            .field("max_length", &self.max_length)
            .field("pad_id", &self.frame.pad)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadModel(format!("{}: not valid JSON: {e}", path.display())))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A `merges.txt` line split into its pair, or an error naming the file and (1-based) line.
fn merge_pair(path: &Path, line_number: usize, line: &str, parts: Option<(&str, &str)>) -> Result<(String, String)> {
    parts.map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| {
        Error::BadModel(format!("{} line {line_number}: `{line}` is not a pair of tokens", path.display()))
    })
}

impl ClipTokenizer {
    /// Loads a hub tokenizer folder in the default mode ([`TokenizerMode::Transformers5`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_with_mode(dir, TokenizerMode::default())
    }

    /// Loads a hub tokenizer folder: the vocabulary and merges (`vocab.json` and `merges.txt`, or
    /// `tokenizer.json` as transformers 5's `save_pretrained` writes it: see `files.rs` for which
    /// wins where both are present), `tokenizer_config.json` (for `model_max_length` and the
    /// special tokens), and `special_tokens_map.json`, `added_tokens.json` and tokenizer.json's
    /// added tokens where present, read as `mode`'s transformers version reads them.
    pub fn from_dir_with_mode(dir: &Path, mode: TokenizerMode) -> Result<Self> {
        let source = files::model_source(dir, mode)?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(Error::BadModel(format!("{}: not a JSON object", config_path.display())));
        }
        let max_length = match config.get("model_max_length").and_then(Value::as_f64) {
            Some(n) if (2.0..=1e6).contains(&n) && n.fract() == 0.0 => n as usize,
            other => {
                return Err(Error::BadModel(format!(
                    "{}: model_max_length is {}, not a usable sequence length (CLIP takes 77)",
                    config_path.display(),
                    other.map_or("missing".to_owned(), |n| n.to_string())
                )))
            }
        };

        // tokenizer.json is read for its model, or for its added tokens where the config has no
        // `added_tokens_decoder` (both references read it then, and only then).
        let json_wanted = source == ModelSource::TokenizerJson || config.get("added_tokens_decoder").is_none();
        let tokenizer_json = match json_wanted && dir.join(files::TOKENIZER_FILE).is_file() {
            true => Some(TokenizerJson::read(dir)?),
            false => None,
        };
        let tokenizer_json = tokenizer_json.as_ref();
        let (engine, frame, vocab_size) = match mode {
            TokenizerMode::Slow => {
                let max_merges = Some(slow::MAX_MERGES);
                let model = files::read_model(dir, source, tokenizer_json, slow::read_merges, max_merges)?;
                let vocab_size = model.vocab.len();
                let (engine, frame) = slow::SlowClip::load(dir, &config, model, tokenizer_json)?;
                (Engine::Slow(engine), frame, vocab_size)
            }
            TokenizerMode::Transformers5 => {
                let model = files::read_model(dir, source, tokenizer_json, fast::read_merges, None)?;
                let vocab_size = model.vocab.len();
                let (engine, frame) = fast::FastClip::load(dir, &config, model, tokenizer_json)?;
                (Engine::Fast(engine), frame, vocab_size)
            }
        };
        Ok(ClipTokenizer { mode, engine, vocab_size, max_length, frame })
    }

    /// Which transformers tokenizer this reproduces.
    pub fn mode(&self) -> TokenizerMode {
        self.mode
    }

    /// The sequence length every [`Tokenized::ids`] has (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The number of entries in the vocabulary, `vocab.json` or tokenizer.json's `model.vocab`
    /// (49408 for CLIP), added tokens outside it not counted.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id that pads [`Tokenized::ids`] (`<|endoftext|>` for SD 1.5, `!` for SDXL's second
    /// tokenizer).
    pub fn pad_id(&self) -> u32 {
        self.frame.pad
    }

    /// Tokenizes a prompt: `<|startoftext|>`, at most `max_length - 2` tokens, `<|endoftext|>`,
    /// then the pad id up to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Tokenized> {
        let mut tokens = self.content_ids(text)?;
        // Both references truncate the prompt's tokens, then frame them (tokenizers: truncation
        // keeps room for the post-processor's two tokens), then pad on the right.
        let keep = self.max_length - 2;
        let dropped_tokens = tokens.len().saturating_sub(keep);
        tokens.truncate(keep);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.frame.bos);
        ids.extend(tokens);
        ids.push(self.frame.eos);
        ids.resize(self.max_length, self.frame.pad);
        Ok(Tokenized { ids, dropped_tokens })
    }

    /// The ids that frame A1111's chunks (`crate::prompt`), and the id of `,`.
    pub fn chunk_frame(&self) -> Result<crate::prompt::ChunkFrame> {
        let comma = match self.content_ids(",")?.as_slice() {
            [id] => Some(*id),
            _ => None,
        };
        Ok(crate::prompt::ChunkFrame { bos: self.frame.bos, eos: self.frame.eos, pad: self.frame.pad, comma })
    }

    /// The prompt's tokens, unframed and untruncated.
    pub fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        match &self.engine {
            Engine::Slow(e) => e.content_ids(text),
            Engine::Fast(e) => e.content_ids(text),
        }
    }
}
