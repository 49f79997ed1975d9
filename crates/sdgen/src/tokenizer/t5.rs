//! T5's sentencepiece Unigram tokenizer (SD 3 / 3.5's `tokenizer_3`), as diffusers' SD 3
//! pipelines call it: `padding="max_length", max_length=N, truncation=True,
//! add_special_tokens=True` (`_get_t5_prompt_embeds`), so every prompt becomes exactly `N` ids:
//! its first `N − 1` tokens, `</s>`, then `<pad>`.
//!
//! The folder's `tokenizer.json` holds the Unigram vocabulary, the sentencepiece normaliser (a
//! `Precompiled` character map) and the added tokens (`<pad>`, `</s>`, `<unk>`, `<extra_id_*>`).
//! transformers 5's `T5Tokenizer` (what `T5TokenizerFast` is now) takes the vocabulary and that
//! character map from the file but builds the rest itself (`tokenization_t5.py`): the `Precompiled`
//! normaliser alone (a `Replace` beside it in a `Sequence`, as newer conversions write, is
//! dropped), `WhitespaceSplit` then `Metaspace("▁", prepend_scheme="always", split=True)` whatever
//! pre-tokenizer the file names (older files say `add_prefix_space: true`, which reads the same),
//! and `</s>` appended. This does the same on top of the `tokenizers` crate's reading of the file.

use std::path::Path;

use serde_json::Value;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::Tokenizer;

use super::{read_json, read_optional_json, Tokenized};
use crate::{Error, Result};

/// The T5 sequence length SD 3 / 3.5 use unless asked otherwise (diffusers' `max_sequence_length`
/// default).
pub const T5_DEFAULT_MAX_LENGTH: usize = 256;

/// The longest T5 sequence diffusers accepts (`check_inputs` refuses `max_sequence_length > 512`).
pub const T5_MAX_LENGTH: usize = 512;

const TOKENIZER_FILE: &str = "tokenizer.json";
const CONFIG_FILE: &str = "tokenizer_config.json";

/// The T5 tokenizer of a hub `tokenizer_3/` folder.
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos: u32,
    pad: u32,
    vocab_size: usize,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_id", &self.eos)
            .field("pad_id", &self.pad)
            .finish_non_exhaustive()
    }
}

/// A special token's text from `tokenizer_config.json`: a plain string or transformers'
/// `{"content": ..}` form; `default` when absent.
fn special_token(config: Option<&Value>, key: &str, default: &str) -> String {
    let value = config.and_then(|c| c.get(key));
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or(default).to_owned(),
        _ => default.to_owned(),
    }
}

/// The `Precompiled` normaliser of a tokenizer.json `normalizer` (itself, or the first inside a
/// `Sequence`), as transformers 5 extracts it; `None` when there is none.
fn precompiled_normalizer(normalizer: &Value) -> Option<&Value> {
    let is_precompiled = |n: &Value| n.get("type").and_then(Value::as_str) == Some("Precompiled");
    match normalizer.get("type").and_then(Value::as_str) {
        Some("Sequence") => normalizer.get("normalizers")?.as_array()?.iter().find(|n| is_precompiled(n)),
        _ if is_precompiled(normalizer) => Some(normalizer),
        _ => None,
    }
}

impl T5Tokenizer {
    /// Loads a hub T5 tokenizer folder: `tokenizer.json` (required: a folder with only
    /// `spiece.model` is refused, naming the file), and `tokenizer_config.json` for the names of
    /// the eos and pad tokens where present (`</s>` and `<pad>` otherwise).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            let spm_only = dir.join("spiece.model").is_file();
            return Err(Error::BadModel(format!(
                "{}: no such file: a T5 tokenizer folder needs {TOKENIZER_FILE}{}",
                path.display(),
                if spm_only {
                    " (this one has only spiece.model: convert it with transformers' T5TokenizerFast and \
                     save_pretrained)"
                } else {
                    ""
                }
            )));
        }
        let json = read_json(&path)?;
        let bad = |what: String| Error::BadModel(format!("{}: {what}", path.display()));
        match json.pointer("/model/type").and_then(Value::as_str) {
            Some("Unigram") => {}
            other => {
                return Err(bad(format!(
                    "model type is {}, not Unigram: not a T5 (sentencepiece) tokenizer",
                    other.map_or("missing".to_owned(), |t| format!("\"{t}\""))
                )))
            }
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| bad(format!("not a valid tokenizer file: {e}")))?;

        let normalizer: Option<NormalizerWrapper> = match json.get("normalizer").and_then(precompiled_normalizer) {
            Some(n) => {
                Some(serde_json::from_value(n.clone()).map_err(|e| bad(format!("bad Precompiled normalizer: {e}")))?)
            }
            None => None,
        };
        inner.with_normalizer(normalizer).map_err(|e| bad(format!("normalizer: {e}")))?;
        let pre_tokenizer = PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
            PreTokenizerWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Always, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        // Framing, truncation and padding are done in `encode`.
        inner.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
        inner.with_truncation(None).map_err(|e| bad(format!("truncation: {e}")))?;
        inner.with_padding(None);

        let config = read_optional_json(&dir.join(CONFIG_FILE))?;
        let id_of = |key: &str, default: &str| {
            let token = special_token(config.as_ref(), key, default);
            inner.token_to_id(&token).ok_or_else(|| {
                bad(format!("the {key} `{token}` (from {CONFIG_FILE} or T5's default) is not in the vocabulary"))
            })
        };
        let eos = id_of("eos_token", "</s>")?;
        let pad = id_of("pad_token", "<pad>")?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self { inner, eos, pad, vocab_size })
    }

    /// The number of tokens, added ones included (`len(tokenizer)`: 32100 for T5 v1.1).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id that ends every sequence (`</s>`, 1 in T5's vocabulary).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id that pads every sequence (`<pad>`, 0 in T5's vocabulary).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Tokenizes a prompt into exactly `max_len` ids: at most `max_len − 1` of its tokens, `</s>`,
    /// then the pad id. `dropped_tokens` counts the tokens cut (diffusers warns about them).
    /// `max_len` must be in `1..=T5_MAX_LENGTH`.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Tokenized> {
        check_max_len(max_len)?;
        let mut tokens = self.content_ids(text)?;
        let keep = max_len - 1;
        let dropped_tokens = tokens.len().saturating_sub(keep);
        tokens.truncate(keep);
        let mut ids = tokens;
        ids.push(self.eos);
        ids.resize(max_len, self.pad);
        Ok(Tokenized { ids, dropped_tokens })
    }

    /// The text of the tokens [`Self::encode`] drops at `max_len`, as diffusers' warning shows it
    /// (`batch_decode` of the cut ids); empty when nothing is dropped.
    pub fn dropped_text(&self, text: &str, max_len: usize) -> Result<String> {
        check_max_len(max_len)?;
        let tokens = self.content_ids(text)?;
        match tokens.get(max_len - 1..) {
            Some(cut) if !cut.is_empty() => self.decode(cut),
            _ => Ok(String::new()),
        }
    }

    /// The text of `ids` (special tokens kept), as transformers' `decode`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::InvalidInput(format!("T5 tokenizer: cannot decode: {e}")))
    }

    /// The prompt's tokens, without `</s>`, untruncated.
    fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::InvalidInput(format!("T5 tokenizer: cannot tokenize the prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

fn check_max_len(max_len: usize) -> Result<()> {
    if max_len == 0 || max_len > T5_MAX_LENGTH {
        return Err(Error::InvalidInput(format!(
            "T5 sequence length {max_len} is outside 1..={T5_MAX_LENGTH} (diffusers refuses more than {T5_MAX_LENGTH})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-t5/tokenizer_3");
    const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/reference/sd3/t5.json");

    fn ids_of(v: &Value) -> Vec<u32> {
        v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
    }

    /// Every prompt of tools/reference/make_t5.py (plain, punctuation, whitespace runs, NFKC
    /// characters, CJK and emoji, special-token text, empty, one longer than 256 tokens) gives
    /// transformers' ids at 256 and 77 tokens, its number of dropped tokens and its warning text.
    #[test]
    fn ids_match_transformers() {
        let tok = T5Tokenizer::from_dir(Path::new(DIR)).unwrap();
        assert_eq!((tok.vocab_size(), tok.eos_id(), tok.pad_id()), (263, 1, 0));
        let reference = read_json(Path::new(REFERENCE)).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        assert!(cases.len() >= 8);
        let mut truncated = 0;
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            for max_len in [256, 77] {
                let want = &case[max_len.to_string()];
                let got = tok.encode(prompt, max_len).unwrap();
                assert_eq!(got.ids, ids_of(&want["ids"]), "{prompt:?} at {max_len}");
                let dropped = want["dropped_tokens"].as_u64().unwrap() as usize;
                assert_eq!(got.dropped_tokens, dropped, "{prompt:?} at {max_len}");
                assert_eq!(tok.dropped_text(prompt, max_len).unwrap(), want["dropped_text"].as_str().unwrap());
                truncated += usize::from(dropped > 0);
            }
        }
        assert!(truncated >= 2, "the long prompt should be cut at both lengths");
    }

    #[test]
    fn lengths_outside_the_limit_are_refused() {
        let tok = T5Tokenizer::from_dir(Path::new(DIR)).unwrap();
        for len in [0, T5_MAX_LENGTH + 1] {
            let err = tok.encode("a cat", len).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)) && err.to_string().contains("1..=512"), "{err}");
        }
        let tokens = tok.encode("a cat", 77).unwrap().ids.iter().take_while(|&&id| id != tok.eos_id()).count();
        assert!(tokens >= 2);
        let one = tok.encode("a cat", 1).unwrap();
        assert_eq!((one.ids, one.dropped_tokens), (vec![1], tokens));
        assert_eq!(tok.encode("a cat", T5_MAX_LENGTH).unwrap().ids.len(), T5_MAX_LENGTH);
    }

    #[test]
    fn missing_or_corrupt_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("no such file"), "{err}");
        std::fs::copy(Path::new(DIR).join("spiece.model"), tmp.path().join("spiece.model")).unwrap();
        let err = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("only spiece.model"), "{err}");
        std::fs::write(tmp.path().join("tokenizer.json"), "{not json").unwrap();
        let err = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("not valid JSON"), "{err}");
        std::fs::write(tmp.path().join("tokenizer.json"), r#"{"model":{"type":"BPE"}}"#).unwrap();
        let err = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("not Unigram"), "{err}");
        let mut json = read_json(&Path::new(DIR).join("tokenizer.json")).unwrap();
        json["model"]["vocab"] = Value::String("oops".into());
        std::fs::write(tmp.path().join("tokenizer.json"), json.to_string()).unwrap();
        let err = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("not a valid tokenizer file"), "{err}");
    }

    /// An older conversion's pre-tokenizer (`Metaspace` with `add_prefix_space`, no
    /// `WhitespaceSplit`) and a `Replace` after the charsmap read as transformers 5 reads them.
    #[test]
    fn the_files_pre_tokenizer_and_extra_normalizers_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let mut json = read_json(&Path::new(DIR).join("tokenizer.json")).unwrap();
        let precompiled = json["normalizer"].clone();
        json["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
            precompiled, {"type": "Replace", "pattern": {"String": "cat"}, "content": "dog"}]});
        json["pre_tokenizer"] =
            serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false});
        std::fs::write(tmp.path().join("tokenizer.json"), json.to_string()).unwrap();
        let reference = T5Tokenizer::from_dir(Path::new(DIR)).unwrap();
        let variant = T5Tokenizer::from_dir(tmp.path()).unwrap();
        for prompt in ["a cat  and\ta hat", "ｆｕｌｌ width"] {
            assert_eq!(variant.encode(prompt, 77).unwrap(), reference.encode(prompt, 77).unwrap(), "{prompt:?}");
        }
    }
}
