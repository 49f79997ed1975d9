//! Where a tokenizer folder's BPE vocabulary and merges come from: `vocab.json` and `merges.txt`
//! (the hub's SD folders), or `tokenizer.json` (what transformers 5's `save_pretrained`, and so
//! diffusers' `pipeline.save_pretrained`, writes: that and `tokenizer_config.json`, nothing else).
//!
//! The modes pick as their transformers versions do:
//!
//! - [`TokenizerMode::Transformers5`]: `tokenizer.json` whenever it exists, even beside
//!   `vocab.json` and `merges.txt` (`TokenizersBackend.convert_to_native_format` takes its
//!   `model.vocab` and `model.merges` and never opens the other two); else the two files.
//! - [`TokenizerMode::Slow`]: `vocab.json` and `merges.txt` when both exist. transformers 4's slow
//!   tokenizer cannot load a folder without them; this reads `tokenizer.json`'s model instead, as
//!   the slow tokenizer would read the two files it was converted from (merges in order, at most
//!   the slow tokenizer's 48,894).
//!
//! Either way only `model.vocab` and `model.merges` matter, and `added_tokens` where the config
//! lists no `added_tokens_decoder` (see the engines): `CLIPTokenizer` builds its own normalizer,
//! pre-tokenizer and BPE options (`</w>`, unk, no dropout) whatever the file says.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{read_json, TokenizerMode};
use crate::{Error, Result};

/// The vocabulary file of the hub's folders.
pub(super) const VOCAB_FILE: &str = "vocab.json";
/// The merges file of the hub's folders.
pub(super) const MERGES_FILE: &str = "merges.txt";
/// The `tokenizers` library's serialisation.
pub(super) const TOKENIZER_FILE: &str = "tokenizer.json";

/// BPE merges, in merge order.
pub(super) type Merges = Vec<(String, String)>;

/// Which files hold a folder's vocabulary and merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ModelSource {
    /// `vocab.json` and `merges.txt`.
    VocabAndMerges,
    /// `tokenizer.json`'s `model`.
    TokenizerJson,
}

/// The files of `dir` that `mode`'s transformers reads the vocabulary and merges from, or an
/// error naming the folder and the files it lacks.
pub(super) fn model_source(dir: &Path, mode: TokenizerMode) -> Result<ModelSource> {
    if !dir.is_dir() {
        return Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer folder")));
    }
    let missing: Vec<&str> = [VOCAB_FILE, MERGES_FILE].into_iter().filter(|f| !dir.join(f).is_file()).collect();
    let has_json = dir.join(TOKENIZER_FILE).is_file();
    match mode {
        TokenizerMode::Transformers5 if has_json => Ok(ModelSource::TokenizerJson),
        _ if missing.is_empty() => Ok(ModelSource::VocabAndMerges),
        _ if has_json => Ok(ModelSource::TokenizerJson),
        _ => Err(Error::BadModel(format!(
            "{}: holds neither {TOKENIZER_FILE} nor {VOCAB_FILE} and {MERGES_FILE} (no {}): a CLIP tokenizer \
             folder needs {TOKENIZER_FILE}, or {VOCAB_FILE} and {MERGES_FILE}",
            dir.display(),
            missing.join(", no ")
        ))),
    }
}

/// A BPE vocabulary and its merges, in merge order.
pub(super) struct BpeModel {
    pub(super) vocab: HashMap<String, u32>,
    pub(super) merges: Merges,
    /// Where they were read from, for messages.
    pub(super) source: String,
}

/// Reads the vocabulary and merges of `dir` from `source`: `merges.txt` with `read_merges_txt`
/// (each mode reads it as its reference does), `tokenizer.json`'s merges up to `max_merges`.
pub(super) fn read_model(
    dir: &Path,
    source: ModelSource,
    tokenizer_json: Option<&TokenizerJson>,
    read_merges_txt: fn(&Path) -> Result<Merges>,
    max_merges: Option<usize>,
) -> Result<BpeModel> {
    match (source, tokenizer_json) {
        (ModelSource::VocabAndMerges, _) => {
            let vocab_path = dir.join(VOCAB_FILE);
            let vocab = serde_json::from_value(read_json(&vocab_path)?).map_err(|e| {
                Error::BadModel(format!("{}: not a JSON object of token -> id: {e}", vocab_path.display()))
            })?;
            let merges = read_merges_txt(&dir.join(MERGES_FILE))?;
            Ok(BpeModel { vocab, merges, source: format!("{} ({VOCAB_FILE}, {MERGES_FILE})", dir.display()) })
        }
        (ModelSource::TokenizerJson, Some(json)) => {
            let mut merges = json.merges()?;
            merges.truncate(max_merges.unwrap_or(usize::MAX));
            Ok(BpeModel { vocab: json.vocab()?, merges, source: json.path.display().to_string() })
        }
        (ModelSource::TokenizerJson, None) => unreachable!("the caller reads tokenizer.json for this source"),
    }
}

/// The parts of a `tokenizer.json` that transformers' `CLIPTokenizer` reads.
pub(super) struct TokenizerJson {
    path: PathBuf,
    model: Value,
    added_tokens: Vec<Value>,
}

/// `tokenizer.json`'s top level, other keys ignored.
#[derive(Deserialize)]
struct RawTokenizerJson {
    #[serde(default)]
    model: Value,
    /// transformers fails on a file without it (`pop("added_tokens")`); none is read as none.
    #[serde(default)]
    added_tokens: Option<Vec<Value>>,
}

impl TokenizerJson {
    /// Reads `dir`'s tokenizer.json.
    pub(super) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        let raw: RawTokenizerJson = serde_json::from_value(read_json(&path)?)
            .map_err(|e| Error::BadModel(format!("{}: not a tokenizers serialisation: {e}", path.display())))?;
        if !raw.model.is_object() {
            return Err(Error::BadModel(format!("{}: `model` is missing or not an object", path.display())));
        }
        Ok(TokenizerJson { path, model: raw.model, added_tokens: raw.added_tokens.unwrap_or_default() })
    }

    /// The file it was read from.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// `added_tokens`, in order: each one's id and its fields (`content`, `single_word`, `lstrip`,
    /// `rstrip`, `normalized`, `special`).
    pub(super) fn added_tokens(&self) -> Result<Vec<(u32, &Map<String, Value>)>> {
        self.added_tokens
            .iter()
            .map(|token| {
                let fields = token.as_object();
                let id = fields.and_then(|f| f.get("id")?.as_u64()).and_then(|i| u32::try_from(i).ok());
                match (fields, id) {
                    (Some(fields), Some(id)) => Ok((id, fields)),
                    _ => Err(Error::BadModel(format!(
                        "{}: added_tokens entry {token} is not a token with an id",
                        self.path.display()
                    ))),
                }
            })
            .collect()
    }

    /// `model.type`, where given, must be BPE (files from before `type` was written have none).
    fn check_bpe(&self) -> Result<()> {
        match self.model.get("type") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::String(t)) if t == "BPE" => Ok(()),
            Some(other) => Err(Error::BadModel(format!(
                "{}: model.type is {other}, not \"BPE\": not a CLIP tokenizer",
                self.path.display()
            ))),
        }
    }

    /// `model.vocab`.
    fn vocab(&self) -> Result<HashMap<String, u32>> {
        self.check_bpe()?;
        let vocab = self
            .model
            .get("vocab")
            .ok_or_else(|| Error::BadModel(format!("{}: model has no vocab", self.path.display())))?;
        HashMap::<String, u32>::deserialize(vocab).map_err(|e| {
            Error::BadModel(format!("{}: model.vocab is not a JSON object of token -> id: {e}", self.path.display()))
        })
    }

    /// `model.merges`, each a `"a b"` string (tokenizers before 0.20) or an `["a", "b"]` pair;
    /// none when the key is absent (transformers then passes no merges).
    fn merges(&self) -> Result<Merges> {
        self.check_bpe()?;
        let Some(merges) = self.model.get("merges") else { return Ok(Vec::new()) };
        let list = merges
            .as_array()
            .ok_or_else(|| Error::BadModel(format!("{}: model.merges is not a list", self.path.display())))?;
        list.iter()
            .enumerate()
            .map(|(i, merge)| {
                // transformers: `tuple(merge.split(" "))`, which must come out a pair.
                let pair = match merge {
                    Value::String(s) => {
                        let mut parts = s.split(' ');
                        match (parts.next(), parts.next(), parts.next()) {
                            (Some(a), Some(b), None) => Some((a.to_owned(), b.to_owned())),
                            _ => None,
                        }
                    }
                    Value::Array(pair) => match pair.as_slice() {
                        [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                        _ => None,
                    },
                    _ => None,
                };
                pair.ok_or_else(|| {
                    Error::BadModel(format!(
                        "{}: model.merges entry {i} ({merge}) is not a pair of tokens",
                        self.path.display()
                    ))
                })
            })
            .collect()
    }
}
