//! [`TokenizerMode::Slow`](super::TokenizerMode::Slow): transformers 4.x's slow `CLIPTokenizer`
//! without `ftfy` (its `BasicTokenizer` path). A prompt goes through
//!
//! 1. added tokens split out of the raw text (`<|startoftext|>`, `<|endoftext|>`, and whatever the
//!    folder's configs add — SDXL's `tokenizer_2` pads with `!`, which makes every `!` an added token);
//! 2. on each remaining piece, `BasicTokenizer` clean-up: control characters dropped, whitespace
//!    normalised, spaces around CJK ideographs, NFC, Python `str.split()`, `str.lower()` per word
//!    (no accent stripping, no punctuation split);
//! 3. CLIP's regex split, byte-level encoding and BPE with the `</w>` end-of-word suffix.
//!
//! Unicode tables are Rust's (regex: 16.0) where the reference uses Python's `unicodedata` (14.0 in
//! Python 3.11). A sweep of every code point (the ignored test `sweep_all_code_points`) finds them
//! disagreeing only on the 10,294 code points assigned in Unicode 15.0–16.0 (new emoji such as 🩷,
//! CJK extensions H and I, …): Python 3.11 drops them as unassigned (category Cn), this keeps them
//! as bytes, as newer Pythons do for the ones their tables know.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;
use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{Model, NormalizedString};

use super::files::{BpeModel, TokenizerJson};
use super::{merge_pair, read_optional_json, FrameIds};
use crate::{Error, Result};

/// The slow tokenizer reads only this many merges (`[1 : 49152 - 256 - 2 + 1]` in
/// transformers' `tokenization_clip.py`, after openai/CLIP's `simple_tokenizer.py`).
pub(super) const MAX_MERGES: usize = 49152 - 256 - 2;

/// CLIP's pre-tokenizer pattern. The reference compiles it with `re.IGNORECASE`, which changes
/// the classes for one character only: U+0345 (combining ypogegrammeni, a mark that case-folds to
/// iota) matches neither `[\p{L}]` nor the negated class in Python's `regex`, so it is dropped,
/// while Rust's `(?i)` would fold it into `\p{L}`. Hence case-insensitive literals only, and
/// U+0345 left out of the classes by hand.
const CLIP_PATTERN: &str =
    r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+";

/// Special-token attributes in the order transformers registers them (`SPECIAL_TOKENS_ATTRIBUTES`),
/// which decides the ids of special tokens missing from the vocabulary.
const SPECIAL_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A token matched in the raw text before any normalisation (transformers' `AddedToken`).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    /// Eats the whitespace on its left.
    lstrip: bool,
    /// Eats the whitespace on its right.
    rstrip: bool,
    /// Only counts as a token when it stands alone between spaces.
    single_word: bool,
}

impl AddedToken {
    fn plain(content: &str, id: u32) -> Self {
        AddedToken { content: content.to_owned(), id, lstrip: false, rstrip: false, single_word: false }
    }
}

/// The slow tokenizer of one folder.
pub(super) struct SlowClip {
    bpe: BPE,
    vocab: HashMap<String, u32>,
    added: Vec<AddedToken>,
    unk_id: u32,
    pattern: Regex,
    /// What `BasicTokenizer._clean_text` drops: NUL, U+FFFD and category C except `\t\n\r`.
    dropped: Regex,
    /// What `_clean_text` turns into a space.
    spaces: Regex,
    byte_chars: [char; 256],
}

/// A special token as the configs write it: a string, `{"content": …, "lstrip": …}`, or null.
fn parse_token(value: &Value, file: &Path, key: &str) -> Result<Option<AddedToken>> {
    let bad = || Error::BadModel(format!("{}: `{key}` is not a token: {value}", file.display()));
    let flag = |name: &str| value.get(name).and_then(Value::as_bool).unwrap_or(false);
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(AddedToken::plain(s, 0))),
        Value::Object(o) => Ok(Some(AddedToken {
            content: o.get("content").and_then(Value::as_str).ok_or_else(bad)?.to_owned(),
            id: 0,
            lstrip: flag("lstrip"),
            rstrip: flag("rstrip"),
            single_word: flag("single_word"),
        })),
        _ => Err(bad()),
    }
}

/// GPT-2's reversible map from bytes to printable characters (`bytes_to_unicode`).
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("256..=323 are chars")
        };
    }
    out
}

/// `BasicTokenizer._is_chinese_char`: the CJK ideograph blocks it puts spaces around.
fn is_cjk_ideograph(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Python's `str.isspace`, which `str.split()` and `str.strip()` use.
fn is_py_space(c: char) -> bool {
    matches!(c,
        '\t'..='\r' | '\x1c'..='\x1f' | ' ' | '\u{85}' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}'
        | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// Sets the added token of `token.id` as a Python dict does: an id already there keeps its place.
fn set_by_id(added: &mut Vec<AddedToken>, token: AddedToken) {
    match added.iter_mut().find(|t| t.id == token.id) {
        Some(slot) => *slot = token,
        None => added.push(token),
    }
}

/// The folder's added tokens with their ids, resolved as transformers 4.x's `from_pretrained` and
/// `PreTrainedTokenizer.__init__` do; returns them with the contents of bos, eos, unk and pad.
///
/// Without an `added_tokens_decoder` in the config, tokenizer.json's `added_tokens` are read after
/// added_tokens.json. transformers 5 writes the extra special tokens as a list
/// `extra_special_tokens`: where `additional_special_tokens` is absent, that list stands for it
/// (transformers 4.57 itself fails on such a list, taking the key for a dict of named tokens).
fn resolve_added_tokens(
    dir: &Path,
    config: &Value,
    vocab: &HashMap<String, u32>,
    tokenizer_json: Option<&TokenizerJson>,
) -> Result<(Vec<AddedToken>, [Option<String>; 4])> {
    let config_path = dir.join("tokenizer_config.json");
    // CLIPTokenizer.__init__'s defaults, for keys the config leaves out entirely.
    let default = |key: &str| match key {
        "bos_token" => Some("<|startoftext|>"),
        "eos_token" | "unk_token" | "pad_token" => Some("<|endoftext|>"),
        _ => None,
    };
    let mut specials: Vec<(&str, Option<AddedToken>)> = Vec::new();
    for key in SPECIAL_KEYS {
        let token = match config.get(key) {
            Some(v) => parse_token(v, &config_path, key)?,
            None => default(key).map(|c| AddedToken::plain(c, 0)),
        };
        specials.push((key, token));
    }
    let mut additional = Vec::new();
    let additional_key = match config.get("additional_special_tokens") {
        None if config.get("extra_special_tokens").is_some_and(Value::is_array) => "extra_special_tokens",
        _ => "additional_special_tokens",
    };
    if let Some(list) = config.get(additional_key).and_then(Value::as_array) {
        for v in list {
            additional.extend(parse_token(v, &config_path, additional_key)?);
        }
    }

    let mut added: Vec<AddedToken> = Vec::new();
    if let Some(decoder) = config.get("added_tokens_decoder") {
        // Newer saves list every added token here; the other files are then not read at all.
        let obj = decoder.as_object().ok_or_else(|| {
            Error::BadModel(format!("{}: added_tokens_decoder is not an object", config_path.display()))
        })?;
        for (id, v) in obj {
            let id = id.parse::<u32>().map_err(|_| {
                Error::BadModel(format!("{}: added_tokens_decoder key `{id}` is not a token id", config_path.display()))
            })?;
            if let Some(mut t) = parse_token(v, &config_path, "added_tokens_decoder")? {
                t.id = id;
                added.push(t);
            }
        }
    } else {
        let map_path = dir.join("special_tokens_map.json");
        if let Some(map) = read_optional_json(&map_path)? {
            for (key, token) in specials.iter_mut() {
                if let Some(v) = map.get(*key) {
                    *token = parse_token(v, &map_path, key)?;
                }
            }
            if let Some(list) = map.get("additional_special_tokens").and_then(Value::as_array) {
                for v in list {
                    if let Some(t) = parse_token(v, &map_path, "additional_special_tokens")? {
                        if !additional.iter().any(|a| a.content == t.content) {
                            additional.push(t);
                        }
                    }
                }
            }
        }
        let added_path = dir.join("added_tokens.json");
        if let Some(map) = read_optional_json(&added_path)? {
            let obj = map
                .as_object()
                .ok_or_else(|| Error::BadModel(format!("{}: not an object of token -> id", added_path.display())))?;
            for (content, id) in obj {
                let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
                    Error::BadModel(format!("{}: `{content}` has id {id}, not a token id", added_path.display()))
                })?;
                set_by_id(&mut added, AddedToken::plain(content, id));
            }
        }
        if let Some(json) = tokenizer_json {
            for (id, fields) in json.added_tokens()? {
                let token = parse_token(&Value::Object(fields.clone()), json.path(), "added_tokens")?;
                set_by_id(&mut added, AddedToken { id, ..token.expect("an object is a token") });
            }
        }
    }

    // `_add_tokens(special tokens)`: a content already added keeps its first definition; one in
    // the vocabulary takes its id there; a new one gets the next id after vocabulary and added.
    let mut known: std::collections::HashSet<&str> = vocab.keys().map(String::as_str).collect();
    known.extend(added.iter().map(|t| t.content.as_str()));
    let mut next_id = known.len() as u32;
    let mut new_tokens = Vec::new();
    let all_specials = specials.iter().filter_map(|(_, t)| t.as_ref()).chain(&additional);
    for token in all_specials {
        let content = token.content.as_str();
        if content.is_empty() || added.iter().chain(&new_tokens).any(|t: &AddedToken| t.content == content) {
            continue;
        }
        let id = match vocab.get(content) {
            Some(&id) => id,
            None => {
                next_id += 1;
                next_id - 1
            }
        };
        new_tokens.push(AddedToken { id, ..token.clone() });
    }
    added.extend(new_tokens);

    let content = |key: &str| -> Option<String> {
        let (_, t) = specials.iter().find(|(k, _)| *k == key)?;
        t.as_ref().map(|t| t.content.clone())
    };
    let names = [content("bos_token"), content("eos_token"), content("unk_token"), content("pad_token")];
    Ok((added, names))
}

/// `merges.txt` as the slow tokenizer reads it: the first line skipped whatever it says, then at
/// most [`MAX_MERGES`] pairs.
pub(super) fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.trim().split('\n').enumerate().skip(1).take(MAX_MERGES) {
        let mut parts = line.split_whitespace();
        let pair = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => Some((a, b)),
            _ => None,
        };
        merges.push(merge_pair(path, i + 1, line, pair)?);
    }
    Ok(merges)
}

impl SlowClip {
    /// Builds the slow tokenizer of `dir` from its vocabulary, merges and configs; `tokenizer_json`
    /// is the folder's tokenizer.json, if any.
    pub(super) fn load(
        dir: &Path,
        config: &Value,
        model: BpeModel,
        tokenizer_json: Option<&TokenizerJson>,
    ) -> Result<(Self, FrameIds)> {
        let BpeModel { vocab, merges, source } = model;
        let (added, [bos, eos, unk, pad]) = resolve_added_tokens(dir, config, &vocab, tokenizer_json)?;
        let id_of = |key: &str, content: Option<String>| -> Result<u32> {
            let content = content.ok_or_else(|| {
                Error::BadModel(format!(
                    "{}: no {key} in tokenizer_config.json or special_tokens_map.json",
                    dir.display()
                ))
            })?;
            // Every special token was added above, so this finds it.
            let id = added.iter().rev().find(|t| t.content == content).map(|t| t.id);
            id.ok_or_else(|| Error::BadModel(format!("{}: {key} `{content}` has no id", dir.display())))
        };
        let frame =
            FrameIds { bos: id_of("bos_token", bos)?, eos: id_of("eos_token", eos)?, pad: id_of("pad_token", pad)? };
        let unk_id = id_of("unk_token", unk)?;

        let bpe_vocab: Vocab = vocab.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .end_of_word_suffix("</w>".to_owned())
            .build()
            .map_err(|e| Error::BadModel(format!("{source}: the vocabulary and merges disagree: {e}")))?;
        let engine = SlowClip {
            bpe,
            vocab,
            added,
            unk_id,
            pattern: Regex::new(CLIP_PATTERN).expect("CLIP pattern compiles"),
            dropped: Regex::new(r"[\x00\x{FFFD}\p{C}&&[^\t\n\r]]").expect("class compiles"),
            spaces: Regex::new(r"[\t\n\r\p{Zs}]").expect("class compiles"),
            byte_chars: byte_chars(),
        };
        Ok((engine, frame))
    }

    /// The prompt's token ids, without bos/eos, untruncated.
    pub(super) fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut tokens = Vec::new();
        for piece in self.split_added(text) {
            match self.added_id(&piece) {
                Some(id) => tokens.push(id),
                None => self.bpe_ids(&piece, &mut tokens)?,
            }
        }
        Ok(tokens)
    }

    /// The added token with this exact content (the last definition, as `_added_tokens_encoder`).
    fn added_token(&self, content: &str) -> Option<&AddedToken> {
        self.added.iter().rev().find(|t| t.content == content)
    }

    fn added_id(&self, content: &str) -> Option<u32> {
        self.added_token(content).map(|t| t.id)
    }

    /// `convert_tokens_to_ids`: added tokens first, then the vocabulary, else unk.
    fn token_id(&self, token: &str) -> u32 {
        self.added_id(token).or_else(|| self.vocab.get(token).copied()).unwrap_or(self.unk_id)
    }

    /// `PreTrainedTokenizer.tokenize`'s split of the raw text on added tokens (its trie matches
    /// the leftmost, then longest, token), with their lstrip/rstrip/single_word rules. Pieces that
    /// equal an added token's content are that token; the rest is text.
    fn split_added(&self, text: &str) -> Vec<String> {
        let mut pieces: Vec<String> = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < text.len() {
            let rest = &text[i..];
            let hit = self
                .added
                .iter()
                .filter(|t| !t.content.is_empty() && rest.starts_with(t.content.as_str()))
                .max_by_key(|t| t.content.len());
            match hit {
                Some(t) => {
                    if start < i {
                        pieces.push(text[start..i].to_owned());
                    }
                    pieces.push(t.content.clone());
                    i += t.content.len();
                    start = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            pieces.push(text[start..].to_owned());
        }

        for i in 0..pieces.len() {
            // Like the reference, this tests each piece's current string (single_word may have
            // emptied it or glued a token onto it).
            let Some(token) = self.added_token(&pieces[i]) else { continue };
            let (lstrip, rstrip, single_word) = (token.lstrip, token.rstrip, token.single_word);
            // The single_word tests look at the neighbours as they were before any stripping.
            let left = (i > 0 && !pieces[i - 1].is_empty()).then(|| pieces[i - 1].clone());
            let right = (i + 1 < pieces.len() && !pieces[i + 1].is_empty()).then(|| pieces[i + 1].clone());
            if let (true, Some(r)) = (rstrip, &right) {
                pieces[i + 1] = r.trim_start_matches(is_py_space).to_owned();
            }
            if let (true, Some(l)) = (lstrip, &left) {
                pieces[i - 1] = l.trim_end_matches(is_py_space).to_owned();
            }
            if single_word && left.as_ref().is_some_and(|l| !l.ends_with(' ')) {
                let t = std::mem::take(&mut pieces[i]);
                pieces[i - 1].push_str(&t);
            } else if single_word && right.as_ref().is_some_and(|r| !r.starts_with(' ')) {
                let t = std::mem::take(&mut pieces[i]);
                pieces[i + 1].insert_str(0, &t);
            }
        }
        pieces.retain(|p| !p.is_empty());
        pieces
    }

    /// `CLIPTokenizer._tokenize` on a piece of text without added tokens.
    fn bpe_ids(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let text = self.basic_tokenize(text);
        for word in self.pattern.find_iter(&text).map(|m| m.as_str()) {
            // The reference's BPE cache starts with these two, so they skip BPE (and `</w>`).
            if word == "<|startoftext|>" || word == "<|endoftext|>" {
                out.push(self.token_id(word));
                continue;
            }
            let encoded: String = word.bytes().map(|b| self.byte_chars[b as usize]).collect();
            let tokens = self
                .bpe
                .tokenize(&encoded)
                .map_err(|e| Error::BadModel(format!("CLIP's BPE cannot tokenize `{word}`: {e}")))?;
            out.extend(tokens.iter().map(|t| self.token_id(&t.value)));
        }
        Ok(())
    }

    /// `BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize`, joined by spaces.
    fn basic_tokenize(&self, text: &str) -> String {
        let text = self.dropped.replace_all(text, "");
        let text = self.spaces.replace_all(&text, " ");
        let mut spaced = String::with_capacity(text.len() + 8);
        for c in text.chars() {
            if is_cjk_ideograph(c) {
                spaced.extend([' ', c, ' ']);
            } else {
                spaced.push(c);
            }
        }
        // NFC comes after the clean-up, so a removed control char can let a mark compose.
        let mut normalized = NormalizedString::from(spaced);
        normalized.nfc();
        let words: Vec<String> =
            normalized.get().split(is_py_space).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
        words.join(" ")
    }
}
