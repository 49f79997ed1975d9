//! [`TokenizerMode::Transformers5`](super::TokenizerMode::Transformers5): transformers 5's
//! `CLIPTokenizer`, which builds a `tokenizers` pipeline in its `__init__`
//! (`transformers/models/clip/tokenization_clip.py`):
//!
//! - normalizer: `Sequence[NFC, Replace(Regex(r"\s+"), " "), Lowercase]`;
//! - pre-tokenizer: `Sequence[Split(CLIP's regex, "removed", invert=True),
//!   ByteLevel(add_prefix_space=False)]`;
//! - model: `BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=unk)`, from `tokenizer.json`
//!   where the folder has one, else from `vocab.json` and `merges.txt` (see `files.rs`);
//! - post-processor: `RobertaProcessing((eos, eos_id), (bos, bos_id))`, i.e. bos … eos.
//!
//! The same components of the `tokenizers` crate run here, so only two things are reproduced by
//! hand: which added tokens transformers 5 registers, with which flags and in which order
//! ([`resolve_added_tokens`], after `PreTrainedTokenizerBase._from_pretrained` and
//! `TokenizersBackend.__init__`), and the framing, which [`super::ClipTokenizer::encode`] does.
//!
//! The reference runs tokenizers 0.23, as this crate does: its `AddedVocabulary` keeps the *last*
//! definition of a token added twice, at the id of its first addition (SD 1.5: `eos_token`
//! `{"normalized": true}`, then `pad_token` `"<|endoftext|>"`, a plain string, which registers it as
//! `normalized: false`). The tokens go to `add_tokens` in one call, in transformers' order, as the
//! reference hands them over, so the library resolves them the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::files::{BpeModel, TokenizerJson};
use super::{merge_pair, read_optional_json, FrameIds};
use crate::{Error, Result};

/// CLIP's pre-tokenizer pattern exactly as transformers 5 writes it (case-sensitive: the
/// normalizer has lower-cased the text already).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`, in order: the order in which the named
/// special tokens are registered, which decides the ids of those missing from the vocabulary.
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// tokenizers' Python `AddedToken` as transformers 5 handles it while loading. `normalized`
/// stays unset until the token reaches the backend, where it defaults to `!special`; transformers
/// flips `special` on before that for named tokens, which flips that default too.
#[derive(Debug, Clone)]
struct PyToken {
    content: String,
    special: bool,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: Option<bool>,
}

impl PyToken {
    /// `AddedToken(content, special=special)`.
    fn new(content: &str, special: bool) -> Self {
        PyToken {
            content: content.to_owned(),
            special,
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: None,
        }
    }

    /// `AddedToken(**fields)`, with `special` forced where the caller passes it.
    fn from_fields(fields: &Map<String, Value>, special: Option<bool>, file: &Path, key: &str) -> Result<Self> {
        let bad = |what: &str| {
            Error::BadModel(format!("{}: `{key}` has {what}: {}", file.display(), Value::Object(fields.clone())))
        };
        let flag = |name: &str| -> Result<Option<bool>> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_bool().map(Some).ok_or_else(|| bad(&format!("a non-boolean `{name}`"))),
            }
        };
        let content = fields.get("content").and_then(Value::as_str).ok_or_else(|| bad("no string `content`"))?;
        Ok(PyToken {
            content: content.to_owned(),
            special: special.map_or(flag("special"), |s| Ok(Some(s)))?.unwrap_or(false),
            single_word: flag("single_word")?.unwrap_or(false),
            lstrip: flag("lstrip")?.unwrap_or(false),
            rstrip: flag("rstrip")?.unwrap_or(false),
            normalized: flag("normalized")?,
        })
    }

    /// The token as the backend stores it (`PyAddedToken.get_token`).
    fn backend(&self) -> AddedToken {
        AddedToken {
            content: self.content.clone(),
            single_word: self.single_word,
            lstrip: self.lstrip,
            rstrip: self.rstrip,
            normalized: self.normalized.unwrap_or(!self.special),
            special: self.special,
        }
    }
}

/// Python's `AddedToken.__eq__` compares the backend forms.
impl PartialEq for PyToken {
    fn eq(&self, other: &Self) -> bool {
        self.backend() == other.backend()
    }
}

/// A special-token value while transformers 5 loads.
#[derive(Debug, Clone, PartialEq)]
enum Special {
    /// A plain string.
    Text(String),
    /// An `AddedToken`.
    Token(PyToken),
    /// A `tokenizer_config.json` object (`{"__type": "AddedToken", …}`), which transformers turns
    /// into an `AddedToken` only after reading `added_tokens.json`; until then its `str()` is a
    /// dict's repr, which matches no token.
    Config(PyToken),
}

impl Special {
    /// Python's `str(value)` where it can match a token's content.
    fn content(&self) -> Option<&str> {
        match self {
            Special::Text(s) => Some(s),
            Special::Token(t) => Some(&t.content),
            Special::Config(_) => None,
        }
    }

    /// `convert_added_tokens`: config objects become `AddedToken`s.
    fn converted(self) -> Special {
        match self {
            Special::Config(t) => Special::Token(t),
            other => other,
        }
    }

    /// The content, once converted.
    fn text(&self) -> &str {
        match self {
            Special::Text(s) => s,
            Special::Token(t) | Special::Config(t) => &t.content,
        }
    }
}

/// A token value of tokenizer_config.json: a string, an object, or null.
fn parse_config_token(value: &Value, file: &Path, key: &str) -> Result<Option<Special>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(Special::Text(s.clone()))),
        Value::Object(o) => Ok(Some(Special::Config(PyToken::from_fields(o, None, file, key)?))),
        _ => Err(Error::BadModel(format!("{}: `{key}` is not a token: {value}", file.display()))),
    }
}

/// A token value of special_tokens_map.json: objects become special `AddedToken`s at once,
/// whatever their `special` says (`AddedToken(**value, special=True)`).
fn parse_map_token(value: &Value, file: &Path, key: &str) -> Result<Option<Special>> {
    match value {
        Value::Object(o) => Ok(Some(Special::Token(PyToken::from_fields(o, Some(true), file, key)?))),
        other => parse_config_token(other, file, key),
    }
}

fn parse_list(
    value: &Value,
    file: &Path,
    key: &str,
    parse: fn(&Value, &Path, &str) -> Result<Option<Special>>,
) -> Result<Vec<Special>> {
    let list = value
        .as_array()
        .ok_or_else(|| Error::BadModel(format!("{}: `{key}` is not a list of tokens: {value}", file.display())))?;
    let mut out = Vec::new();
    for v in list {
        out.extend(parse(v, file, key)?);
    }
    Ok(out)
}

/// Python truthiness of an optional JSON value.
fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// Inserts into an insertion-ordered map as a Python dict does: a known key keeps its place.
fn dict_set(dict: &mut Vec<(String, Special)>, key: &str, value: Special) {
    match dict.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => dict.push((key.to_owned(), value)),
    }
}

/// What transformers 5 registers: the tokens handed to the backend's `add_tokens`, in order, and
/// the contents of bos, eos, unk and pad.
struct Resolved {
    to_add: Vec<PyToken>,
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
}

/// The folder's added and special tokens, as transformers 5's `from_pretrained` resolves them for
/// `CLIPTokenizer` (`tokenization_utils_base.py`: `_from_pretrained` and
/// `PreTrainedTokenizerBase.__init__`; `tokenization_utils_tokenizers.py`:
/// `TokenizersBackend.__init__`; `tokenization_clip.py`: the defaults).
///
/// Without an `added_tokens_decoder` in the config, `tokenizer.json`'s `added_tokens` join the
/// legacy files' tokens (they are all transformers 5's `save_pretrained` keeps of them).
///
/// JSON objects are read with sorted keys (serde_json's map), where Python keeps the file's order:
/// that only matters for the ids of several model-specific `*_token`s missing from the vocabulary,
/// and for contents defined twice in one file, which no CLIP folder has.
fn resolve_added_tokens(dir: &Path, config: &Value, tokenizer_json: Option<&TokenizerJson>) -> Result<Resolved> {
    let config_path = dir.join("tokenizer_config.json");
    let obj = config.as_object().expect("checked by the caller");

    // `init_kwargs` as far as tokens go: the named special tokens (`None` where null) …
    let mut named: HashMap<&str, Option<Special>> = HashMap::new();
    for key in SPECIAL_KEYS {
        if let Some(v) = obj.get(key) {
            named.insert(key, parse_config_token(v, &config_path, key)?);
        }
    }
    // … `init_kwargs["extra_special_tokens"]` and `["additional_special_tokens"]` (`None` when
    // absent; a null extra list reads as empty) …
    let parse_extra = |v: &Value, key: &str| -> Result<Vec<Special>> {
        match v {
            Value::Null => Ok(Vec::new()),
            v => parse_list(v, &config_path, key, parse_config_token),
        }
    };
    let mut extra: Option<Vec<Special>> = None;
    let mut additional: Option<Vec<Special>> = None;
    // … and model-specific named tokens (other `*_token` keys): `explicit` ones, collected before
    // conversion (strings, and an `extra_special_tokens` object), and `auto` ones, which
    // `PreTrainedTokenizerBase.__init__` finds left over (converted objects).
    let (mut explicit, mut auto) = (Vec::new(), Vec::new());
    let extra_value = obj.get("extra_special_tokens");
    match obj.get("additional_special_tokens") {
        // v5 renames `additional_special_tokens` to `extra_special_tokens` unless the latter is set.
        Some(v) if !truthy(extra_value) => extra = Some(parse_extra(v, "additional_special_tokens")?),
        Some(v) => additional = Some(parse_extra(v, "additional_special_tokens")?),
        None => {}
    }
    match extra_value {
        _ if extra.is_some() => {}
        // An object names model-specific tokens, and is no list of extras any more.
        Some(Value::Object(map)) => {
            for (k, t) in map {
                if let Some(t) = parse_config_token(t, &config_path, k)? {
                    dict_set(&mut explicit, k, t);
                }
            }
        }
        Some(v) => extra = Some(parse_extra(v, "extra_special_tokens")?),
        None => {}
    }
    for (key, v) in obj {
        if key.ends_with("_token") && !SPECIAL_KEYS.contains(&key.as_str()) {
            match v {
                Value::String(s) => dict_set(&mut explicit, key, Special::Text(s.clone())),
                // Only objects marked as AddedTokens get converted, and only those count.
                Value::Object(o) if o.get("__type").and_then(Value::as_str) == Some("AddedToken") => {
                    auto.extend(parse_config_token(v, &config_path, key)?.map(|t| (key.clone(), t)))
                }
                _ => {}
            }
        }
    }

    // Tokens with fixed definitions: `added_tokens_decoder` when the config has one, else the
    // legacy files (special_tokens_map.json overriding the config, then added_tokens.json, then
    // tokenizer.json's added_tokens). `decoder` is by id; `by_content` is `added_tokens_map`, whose
    // later definitions of a content win.
    let mut decoder: BTreeMap<u32, PyToken> = BTreeMap::new();
    let mut by_content: HashMap<String, PyToken> = HashMap::new();
    if let Some(dec) = obj.get("added_tokens_decoder") {
        let dec = dec.as_object().ok_or_else(|| {
            Error::BadModel(format!("{}: added_tokens_decoder is not an object", config_path.display()))
        })?;
        for (id, v) in dec {
            let id = id.parse::<u32>().map_err(|_| {
                Error::BadModel(format!("{}: added_tokens_decoder key `{id}` is not a token id", config_path.display()))
            })?;
            let fields = v.as_object().ok_or_else(|| {
                Error::BadModel(format!("{}: added_tokens_decoder `{id}` is not a token: {v}", config_path.display()))
            })?;
            let token = PyToken::from_fields(fields, None, &config_path, "added_tokens_decoder")?;
            by_content.insert(token.content.clone(), token.clone());
            decoder.insert(id, token);
        }
    } else {
        let map_path = dir.join("special_tokens_map.json");
        if let Some(map) = read_optional_json(&map_path)? {
            let map =
                map.as_object().ok_or_else(|| Error::BadModel(format!("{}: not a JSON object", map_path.display())))?;
            for key in SPECIAL_KEYS {
                if let Some(v) = map.get(key) {
                    named.insert(key, parse_map_token(v, &map_path, key)?);
                }
            }
            match map.get("extra_special_tokens") {
                Some(v @ Value::Array(_)) => {
                    let mut merged = extra.take().unwrap_or_default();
                    for t in parse_list(v, &map_path, "extra_special_tokens", parse_map_token)? {
                        if !merged.contains(&t) {
                            merged.push(t);
                        }
                    }
                    extra = Some(merged);
                }
                Some(Value::Object(m)) => {
                    for (k, t) in m {
                        if let Some(t) = parse_map_token(t, &map_path, k)? {
                            dict_set(&mut explicit, k, t);
                        }
                    }
                    extra = None;
                }
                Some(_) => extra = Some(Vec::new()),
                None => {}
            }
            if let Some(v) = map.get("additional_special_tokens") {
                additional = Some(match v {
                    Value::Null => Vec::new(),
                    v => parse_list(v, &map_path, "additional_special_tokens", parse_map_token)?,
                });
            }
            for (key, v) in map {
                if key.ends_with("_token") && !SPECIAL_KEYS.contains(&key.as_str()) && (v.is_string() || v.is_object())
                {
                    if let Some(t) = parse_map_token(v, &map_path, key)? {
                        dict_set(&mut auto, key, t);
                    }
                }
            }
        }
        let added_path = dir.join("added_tokens.json");
        if let Some(map) = read_optional_json(&added_path)? {
            let map = map
                .as_object()
                .ok_or_else(|| Error::BadModel(format!("{}: not an object of token -> id", added_path.display())))?;
            // A token is special when a named or extra special token has its content (`if
            // init_kwargs.get(k)`: an empty string does not count).
            let named_contents = SPECIAL_KEYS.iter().filter_map(|k| named.get(k)?.as_ref()?.content());
            let extra_contents = extra.iter().flatten().filter_map(Special::content);
            let special: Vec<&str> = named_contents.filter(|c| !c.is_empty()).chain(extra_contents).collect();
            for (content, id) in map {
                let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
                    Error::BadModel(format!("{}: `{content}` has id {id}, not a token id", added_path.display()))
                })?;
                let is_special = special.contains(&content.as_str());
                let token = PyToken { normalized: Some(!is_special), ..PyToken::new(content, is_special) };
                by_content.insert(content.clone(), token.clone());
                decoder.insert(id, token);
            }
        }
        if let Some(json) = tokenizer_json {
            for (id, fields) in json.added_tokens()? {
                let token = PyToken::from_fields(fields, None, json.path(), "added_tokens")?;
                by_content.insert(token.content.clone(), token.clone());
                decoder.insert(id, token);
            }
        }
    }

    // `convert_added_tokens`, then named tokens take the decoder's definition of their content.
    for value in named.values_mut() {
        if let Some(v) = value.take() {
            let v = v.converted();
            *value = Some(match by_content.get(v.text()) {
                Some(t) => Special::Token(t.clone()),
                None => v,
            });
        }
    }
    // `PreTrainedTokenizerBase.__init__` takes `additional_special_tokens` as the extras only
    // where no `extra_special_tokens` key is left.
    let extras = match (extra, additional) {
        (None, Some(additional)) => additional,
        (extra, _) => extra.unwrap_or_default(),
    };
    let extras: Vec<Special> = extras.into_iter().map(Special::converted).collect();
    // CLIPTokenizer.__init__'s defaults, for keys given nowhere.
    for (key, default) in [
        ("unk_token", "<|endoftext|>"),
        ("bos_token", "<|startoftext|>"),
        ("eos_token", "<|endoftext|>"),
        ("pad_token", "<|endoftext|>"),
    ] {
        named.entry(key).or_insert_with(|| Some(Special::Text(default.to_owned())));
    }
    // `{**auto, **explicit}` follows the named tokens in the special-tokens map.
    for (key, value) in explicit {
        dict_set(&mut auto, &key, value);
    }
    let specials: Vec<Special> = SPECIAL_KEYS
        .iter()
        .filter_map(|k| named.get(k).cloned().flatten())
        .chain(auto.into_iter().map(|(_, v)| v.converted()))
        .collect();

    // `TokenizersBackend.__init__`: the decoder's tokens by id, then each named and extra token
    // whose content is not among the decoder's and which is not in the list yet.
    let decoder_contents: Vec<&str> = decoder.values().map(|t| t.content.as_str()).collect();
    let mut to_add: Vec<Special> = decoder.values().cloned().map(Special::Token).collect();
    for value in specials.iter().chain(&extras) {
        if !decoder_contents.contains(&value.text()) && !to_add.contains(value) {
            to_add.push(value.clone());
        }
    }
    let all_named: Vec<&str> = specials.iter().map(Special::text).filter(|c| !c.is_empty()).collect();
    let to_add = to_add
        .into_iter()
        .map(|v| match v {
            Special::Text(s) => PyToken::new(&s, true),
            Special::Token(mut t) | Special::Config(mut t) => {
                if !t.special && all_named.contains(&t.content.as_str()) {
                    t.special = true;
                }
                t
            }
        })
        .collect();

    let content = |key: &str| named.get(key).cloned().flatten().map(|s| s.text().to_owned());
    Ok(Resolved {
        to_add,
        bos: content("bos_token"),
        eos: content("eos_token"),
        unk: content("unk_token"),
        pad: content("pad_token"),
    })
}

/// `merges.txt` as tokenizers' `BPE.read_file` reads it: every line but those starting with
/// `#version`, each exactly two tokens separated by one space.
pub(super) fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let mut parts = line.split(' ');
        let pair = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => Some((a, b)),
            _ => None,
        };
        merges.push(merge_pair(path, i + 1, line, pair)?);
    }
    Ok(merges)
}

/// The transformers 5 tokenizer of one folder.
pub(super) struct FastClip {
    tokenizer: Tokenizer,
}

impl FastClip {
    /// Builds the tokenizers pipeline of `dir` as transformers 5's `CLIPTokenizer` does, on the
    /// folder's vocabulary and merges; `tokenizer_json` is the folder's tokenizer.json, if any.
    pub(super) fn load(
        dir: &Path,
        config: &Value,
        model: BpeModel,
        tokenizer_json: Option<&TokenizerJson>,
    ) -> Result<(Self, FrameIds)> {
        let resolved = resolve_added_tokens(dir, config, tokenizer_json)?;

        let bpe_vocab: Vocab = model.vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, model.merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_owned())
            .fuse_unk(false)
            // transformers passes `str(unk_token)`: "None" when there is none.
            .unk_token(resolved.unk.clone().unwrap_or_else(|| "None".to_owned()))
            .build()
            .map_err(|e| Error::BadModel(format!("{}: the vocabulary and merges disagree: {e}", model.source)))?;

        let mut tokenizer = Tokenizer::new(bpe);
        let replace = Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ").expect("whitespace pattern compiles");
        let normalizer = NormalizerSequence::new(vec![NFC.into(), replace.into(), Lowercase.into()]);
        // Setting a normalizer re-normalises the added tokens, of which there are none yet.
        tokenizer.with_normalizer(Some(normalizer)).expect("no added tokens to normalise yet");
        let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.to_owned()), SplitDelimiterBehavior::Removed, true)
            .expect("CLIP pattern compiles");
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer
            .add_tokens(resolved.to_add.iter().map(PyToken::backend))
            .map_err(|e| Error::BadModel(format!("{}: cannot register the added tokens: {e}", dir.display())))?;

        // `convert_tokens_to_ids`: added tokens, then the vocabulary, else the unk id.
        let unk_id = resolved.unk.as_deref().and_then(|u| tokenizer.token_to_id(u));
        let id_of = |key: &str, content: &Option<String>| -> Result<u32> {
            let content = content.as_deref().ok_or_else(|| {
                Error::BadModel(format!(
                    "{}: no {key} in tokenizer_config.json or special_tokens_map.json",
                    dir.display()
                ))
            })?;
            tokenizer
                .token_to_id(content)
                .or(unk_id)
                .ok_or_else(|| Error::BadModel(format!("{}: {key} `{content}` has no id", dir.display())))
        };
        let frame = FrameIds {
            bos: id_of("bos_token", &resolved.bos)?,
            eos: id_of("eos_token", &resolved.eos)?,
            pad: id_of("pad_token", &resolved.pad)?,
        };
        Ok((FastClip { tokenizer }, frame))
    }

    /// The registered added tokens by id, as `[id, content, single_word, lstrip, rstrip, normalized,
    /// special]` rows (the reference's `v5_folders.*.added_tokens`).
    #[cfg(test)]
    pub(super) fn added_token_rows(&self) -> Vec<Value> {
        let decoder = self.tokenizer.get_added_tokens_decoder();
        let mut rows: Vec<(&u32, &AddedToken)> = decoder.iter().collect();
        rows.sort_by_key(|(id, _)| **id);
        rows.into_iter()
            .map(|(id, t)| {
                serde_json::json!([id, t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special])
            })
            .collect()
    }

    /// The prompt's token ids, without bos/eos, untruncated.
    pub(super) fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::InvalidInput(format!("CLIP's tokenizer cannot tokenize {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}
