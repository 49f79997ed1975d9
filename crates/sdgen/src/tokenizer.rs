//! CLIP's byte-level BPE tokenizer, as the Stable Diffusion pipelines tokenize a prompt.
//!
//! The reference is transformers 4.x's *slow* `CLIPTokenizer` without `ftfy` installed (its
//! `BasicTokenizer` path), called as diffusers calls it: `padding="max_length", max_length=77,
//! truncation=True`. A prompt goes through
//!
//! 1. added tokens split out of the raw text (`<|startoftext|>`, `<|endoftext|>`, and whatever the
//!    folder's configs add — SDXL's `tokenizer_2` pads with `!`, which makes every `!` an added token);
//! 2. on each remaining piece, `BasicTokenizer` clean-up: control characters dropped, whitespace
//!    normalised, spaces around CJK ideographs, NFC, Python `str.split()`, `str.lower()` per word
//!    (no accent stripping, no punctuation split);
//! 3. CLIP's regex split, byte-level encoding and BPE with the `</w>` end-of-word suffix;
//! 4. `<|startoftext|>` … `<|endoftext|>`, truncated to `model_max_length` and padded with the
//!    pad token.
//!
//! Where the tokenizers-backed class (transformers 4.x `CLIPTokenizerFast`, and `CLIPTokenizer`
//! itself from transformers 5 on) gives other ids, `testdata/reference/tokens.json` records them;
//! see `tools/reference/make_tokens.py`.
//!
//! Unicode tables are Rust's (regex 16.0, std's case mapping) and tokenizers' NFC (9.0), where the
//! reference uses Python's `unicodedata`; characters assigned in the versions between may differ.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;
use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{Model, NormalizedString};

use crate::{Error, Result};

/// The slow tokenizer reads only this many merges (`[1 : 49152 - 256 - 2 + 1]` in
/// transformers' `tokenization_clip.py`, after openai/CLIP's `simple_tokenizer.py`).
const MAX_MERGES: usize = 49152 - 256 - 2;

/// CLIP's pre-tokenizer pattern. The reference compiles it with `re.IGNORECASE`, which changes
/// the classes for one character only: U+0345 (combining ypogegrammeni, a mark that case-folds to
/// iota) matches neither `[\p{L}]` nor the negated class in Python's `regex`, so it is dropped,
/// while Rust's `(?i)` would fold it into `\p{L}`. Hence case-insensitive literals only, and
/// U+0345 left out of the classes by hand.
const CLIP_PATTERN: &str = r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+";

/// Special-token attributes in the order transformers registers them (`SPECIAL_TOKENS_ATTRIBUTES`),
/// which decides the ids of special tokens missing from the vocabulary.
const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A prompt's token ids, ready for the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// `<|startoftext|>`, the kept tokens, `<|endoftext|>`, then padding: exactly `max_length` ids.
    pub ids: Vec<u32>,
    /// How many of the prompt's tokens did not fit and were cut (0 when it fits).
    pub dropped_tokens: usize,
}

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

/// The CLIP tokenizer of a hub `tokenizer/` folder.
pub struct ClipTokenizer {
    bpe: BPE,
    vocab: HashMap<String, u32>,
    added: Vec<AddedToken>,
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    pattern: Regex,
    /// What `BasicTokenizer._clean_text` drops: NUL, U+FFFD and category C except `\t\n\r`.
    dropped: Regex,
    /// What `_clean_text` turns into a space.
    spaces: Regex,
    byte_chars: [char; 256],
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::BadModel(format!("{}: not valid JSON: {e}", path.display())))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special token as the configs write it: a string, `{"content": …, "lstrip": …}`, or null.
fn parse_token(value: &Value, file: &Path, key: &str) -> Result<Option<AddedToken>> {
    let bad = || {
        Error::BadModel(format!(
            "{}: `{key}` is not a token: {value}",
            file.display()
        ))
    };
    let flag = |name: &str| value.get(name).and_then(Value::as_bool).unwrap_or(false);
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(AddedToken {
            content: s.clone(),
            id: 0,
            lstrip: false,
            rstrip: false,
            single_word: false,
        })),
        Value::Object(o) => Ok(Some(AddedToken {
            content: o
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(bad)?
                .to_owned(),
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

/// The folder's added tokens with their ids, resolved as transformers 4.x's `from_pretrained` and
/// `PreTrainedTokenizer.__init__` do; returns them with the contents of bos, eos, unk and pad.
fn resolve_added_tokens(
    dir: &Path,
    config: &Value,
    vocab: &HashMap<String, u32>,
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
    if let Some(list) = config
        .get("additional_special_tokens")
        .and_then(Value::as_array)
    {
        for v in list {
            additional.extend(parse_token(v, &config_path, "additional_special_tokens")?);
        }
    }

    let mut added: Vec<AddedToken> = Vec::new();
    if let Some(decoder) = config.get("added_tokens_decoder") {
        // Newer saves list every added token here; the other files are then not read at all.
        let obj = decoder.as_object().ok_or_else(|| {
            Error::BadModel(format!(
                "{}: added_tokens_decoder is not an object",
                config_path.display()
            ))
        })?;
        for (id, v) in obj {
            let id = id.parse::<u32>().map_err(|_| {
                Error::BadModel(format!(
                    "{}: added_tokens_decoder key `{id}` is not a token id",
                    config_path.display()
                ))
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
            if let Some(list) = map
                .get("additional_special_tokens")
                .and_then(Value::as_array)
            {
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
            let obj = map.as_object().ok_or_else(|| {
                Error::BadModel(format!(
                    "{}: not an object of token -> id",
                    added_path.display()
                ))
            })?;
            for (content, id) in obj {
                let id = id
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| {
                        Error::BadModel(format!(
                            "{}: `{content}` has id {id}, not a token id",
                            added_path.display()
                        ))
                    })?;
                added.push(AddedToken::plain(content, id));
            }
        }
    }

    // `_add_tokens(special tokens)`: a content already added keeps its first definition; one in
    // the vocabulary takes its id there; a new one gets the next id after vocabulary and added.
    let mut known: std::collections::HashSet<&str> = vocab.keys().map(String::as_str).collect();
    known.extend(added.iter().map(|t| t.content.as_str()));
    let mut next_id = known.len() as u32;
    let mut new_tokens = Vec::new();
    let all_specials = specials
        .iter()
        .filter_map(|(_, t)| t.as_ref())
        .chain(&additional);
    for token in all_specials {
        let content = token.content.as_str();
        if content.is_empty()
            || added
                .iter()
                .chain(&new_tokens)
                .any(|t: &AddedToken| t.content == content)
        {
            continue;
        }
        let id = match vocab.get(content) {
            Some(&id) => id,
            None => {
                next_id += 1;
                next_id - 1
            }
        };
        new_tokens.push(AddedToken {
            id,
            ..token.clone()
        });
    }
    added.extend(new_tokens);

    let content = |key: &str| -> Option<String> {
        let (_, t) = specials.iter().find(|(k, _)| *k == key)?;
        t.as_ref().map(|t| t.content.clone())
    };
    let names = [
        content("bos_token"),
        content("eos_token"),
        content("unk_token"),
        content("pad_token"),
    ];
    Ok((added, names))
}

impl AddedToken {
    fn plain(content: &str, id: u32) -> Self {
        AddedToken {
            content: content.to_owned(),
            id,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }
}

impl ClipTokenizer {
    /// Loads a hub tokenizer folder: `vocab.json`, `merges.txt`, `tokenizer_config.json` (for
    /// `model_max_length` and the special tokens), and `special_tokens_map.json` and
    /// `added_tokens.json` where present, read as transformers 4.x reads them.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let vocab: HashMap<String, u32> =
            serde_json::from_value(read_json(&vocab_path)?).map_err(|e| {
                Error::BadModel(format!(
                    "{}: not a JSON object of token -> id: {e}",
                    vocab_path.display()
                ))
            })?;
        let merges = read_merges(&dir.join("merges.txt"))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
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

        let (added, [bos, eos, unk, pad]) = resolve_added_tokens(dir, &config, &vocab)?;
        let id_of = |key: &str, content: Option<String>| -> Result<u32> {
            let content = content.ok_or_else(|| {
                Error::BadModel(format!(
                    "{}: no {key} in tokenizer_config.json or special_tokens_map.json",
                    dir.display()
                ))
            })?;
            // Every special token was added above, so this finds it.
            let id = added
                .iter()
                .rev()
                .find(|t| t.content == content)
                .map(|t| t.id);
            id.ok_or_else(|| {
                Error::BadModel(format!("{}: {key} `{content}` has no id", dir.display()))
            })
        };
        let (bos_id, eos_id) = (id_of("bos_token", bos)?, id_of("eos_token", eos)?);
        let (unk_id, pad_id) = (id_of("unk_token", unk)?, id_of("pad_token", pad)?);

        let bpe_vocab: Vocab = vocab.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .end_of_word_suffix("</w>".to_owned())
            .build()
            .map_err(|e| {
                Error::BadModel(format!(
                    "{}: vocab.json and merges.txt disagree: {e}",
                    dir.display()
                ))
            })?;
        Ok(ClipTokenizer {
            bpe,
            vocab,
            added,
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            max_length,
            pattern: Regex::new(CLIP_PATTERN).expect("CLIP pattern compiles"),
            dropped: Regex::new(r"[\x00\x{FFFD}\p{C}&&[^\t\n\r]]").expect("class compiles"),
            spaces: Regex::new(r"[\t\n\r\p{Zs}]").expect("class compiles"),
            byte_chars: byte_chars(),
        })
    }

    /// The sequence length every [`Tokenized::ids`] has (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The number of entries in `vocab.json` (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The id that pads [`Tokenized::ids`] (`<|endoftext|>` for SD 1.5, `!` for SDXL's second
    /// tokenizer).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes a prompt: `<|startoftext|>`, at most `max_length - 2` tokens, `<|endoftext|>`,
    /// then the pad id up to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Tokenized> {
        let mut tokens = Vec::new();
        for piece in self.split_added(text) {
            match self.added_id(&piece) {
                Some(id) => tokens.push(id),
                None => self.bpe_ids(&piece, &mut tokens)?,
            }
        }
        let keep = self.max_length - 2;
        let dropped_tokens = tokens.len().saturating_sub(keep);
        tokens.truncate(keep);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(Tokenized {
            ids,
            dropped_tokens,
        })
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
        self.added_id(token)
            .or_else(|| self.vocab.get(token).copied())
            .unwrap_or(self.unk_id)
    }

    /// `PreTrainedTokenizer.tokenize`'s split of the raw text on added tokens (its trie matches
    /// the leftmost, then longest, token), with their lstrip/rstrip/single_word rules. Pieces that
    /// equal an added token's content are that token; the rest is text.
    fn split_added(&self, text: &str) -> Vec<String> {
        let mut pieces: Vec<String> = Vec::new();
        let mut is_added: Vec<bool> = Vec::new();
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
                        is_added.push(false);
                    }
                    pieces.push(t.content.clone());
                    is_added.push(true);
                    i += t.content.len();
                    start = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        if start < text.len() {
            pieces.push(text[start..].to_owned());
            is_added.push(false);
        }

        for i in 0..pieces.len() {
            // The reference tests the piece's current string, which single_word may have emptied.
            let Some(token) = (is_added[i])
                .then(|| self.added_token(&pieces[i]))
                .flatten()
            else {
                continue;
            };
            let (lstrip, rstrip, single_word) = (token.lstrip, token.rstrip, token.single_word);
            // The single_word tests look at the neighbours as they were before any stripping.
            let left = (i > 0 && !pieces[i - 1].is_empty()).then(|| pieces[i - 1].clone());
            let right =
                (i + 1 < pieces.len() && !pieces[i + 1].is_empty()).then(|| pieces[i + 1].clone());
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
            let tokens = self.bpe.tokenize(&encoded).map_err(|e| {
                Error::InvalidInput(format!("cannot tokenize `{word}` with CLIP's BPE: {e}"))
            })?;
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
        let words: Vec<String> = normalized
            .get()
            .split(is_py_space)
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        words.join(" ")
    }
}

/// `merges.txt` as the slow tokenizer reads it: the first line skipped whatever it says, then at
/// most [`MAX_MERGES`] pairs.
fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.trim().split('\n').enumerate().skip(1).take(MAX_MERGES) {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_owned(), b.to_owned())),
            _ => {
                return Err(Error::BadModel(format!(
                    "{} line {}: `{line}` is not a pair of tokens",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const TOKENIZER_DIR: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/clip-tokenizer");
    const REFERENCE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/reference/tokens.json"
    );

    /// A tokenizer folder for config `name`: sd15 is testdata/clip-tokenizer itself; a variant is
    /// its vocabulary with the variant's config files, laid out in a temporary folder.
    fn tokenizer_dir(name: &str, tmp: &Path) -> PathBuf {
        let base = PathBuf::from(TOKENIZER_DIR);
        if name == "sd15" {
            return base;
        }
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(base.join(f), dir.join(f)).unwrap();
        }
        for entry in std::fs::read_dir(base.join("variants").join(name)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        dir
    }

    fn ids_of(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    }

    /// Every prompt of the reference, under every config, gives exactly the slow CLIPTokenizer's
    /// 77 ids and untruncated length.
    #[test]
    fn matches_transformers_slow_clip_tokenizer() {
        let reference = read_json(Path::new(REFERENCE)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let configs = reference["configs"].as_object().unwrap();
        let cases = reference["cases"].as_array().unwrap();
        assert!(
            cases.len() > 300,
            "the reference should hold a few hundred prompts"
        );
        for (name, config) in configs {
            let tok = ClipTokenizer::from_dir(&tokenizer_dir(name, tmp.path())).unwrap();
            assert_eq!(
                tok.max_length(),
                config["max_length"].as_u64().unwrap() as usize,
                "{name}"
            );
            assert_eq!(
                tok.vocab_size(),
                config["vocab_size"].as_u64().unwrap() as usize,
                "{name}"
            );
            let pad_id = config["pad_id"].as_u64().unwrap() as u32;
            assert_eq!(tok.pad_id(), pad_id, "{name}");
            let mut failures = Vec::new();
            for case in cases {
                let prompt = case["prompt"].as_str().unwrap();
                // A variant leaves out ids equal to sd15's.
                let rec = if case[name].get("ids").is_some() {
                    &case[name]
                } else {
                    &case["sd15"]
                };
                let mut want = ids_of(&rec["ids"]);
                want.resize(tok.max_length(), pad_id);
                let n_untruncated = rec["n_untruncated"].as_u64().unwrap() as usize;
                let want_dropped = n_untruncated.saturating_sub(tok.max_length());
                let got = tok.encode(prompt).unwrap();
                if got.ids != want || got.dropped_tokens != want_dropped {
                    failures.push(format!(
                        "{name} {prompt:?}:\n  got  {:?} dropped {}\n  want {want:?} dropped {want_dropped}",
                        got.ids, got.dropped_tokens
                    ));
                }
            }
            assert!(
                failures.is_empty(),
                "{} of {} prompts differ:\n{}",
                failures.len(),
                cases.len(),
                failures.join("\n")
            );
        }
    }

    #[test]
    fn short_prompt_is_framed_and_padded() {
        let tok = ClipTokenizer::from_dir(Path::new(TOKENIZER_DIR)).unwrap();
        let t = tok.encode("a photo of a cat").unwrap();
        assert_eq!(&t.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(t.ids[7..].iter().all(|&i| i == 49407));
        assert_eq!((t.ids.len(), t.dropped_tokens), (77, 0));
        let empty = tok.encode("").unwrap();
        assert_eq!(&empty.ids[..2], &[49406, 49407]);
        let long = tok.encode(&"cat ".repeat(100)).unwrap();
        assert_eq!((long.ids[76], long.dropped_tokens), (49407, 25));
    }

    fn broken_copy(tmp: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
        let dir = tmp.join("broken");
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            std::fs::copy(Path::new(TOKENIZER_DIR).join(f), dir.join(f)).unwrap();
        }
        edit(&dir);
        dir
    }

    fn load_error(dir: &Path) -> String {
        ClipTokenizer::from_dir(dir).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = broken_copy(tmp.path(), |d| {
            std::fs::remove_file(d.join("vocab.json")).unwrap()
        });
        assert!(
            load_error(&dir).contains("vocab.json"),
            "{}",
            load_error(&dir)
        );

        let dir = broken_copy(tmp.path(), |d| {
            std::fs::write(d.join("merges.txt"), "#v\na b c\n").unwrap()
        });
        let err = load_error(&dir);
        assert!(err.contains("merges.txt line 2"), "{err}");

        let dir = broken_copy(tmp.path(), |d| {
            std::fs::write(d.join("tokenizer_config.json"), "{}").unwrap()
        });
        let err = load_error(&dir);
        assert!(
            err.contains("tokenizer_config.json") && err.contains("model_max_length"),
            "{err}"
        );

        let dir = broken_copy(tmp.path(), |d| {
            std::fs::write(d.join("vocab.json"), "[1, 2]").unwrap()
        });
        assert!(
            load_error(&dir).contains("vocab.json"),
            "{}",
            load_error(&dir)
        );

        let dir = broken_copy(tmp.path(), |d| {
            std::fs::write(d.join("special_tokens_map.json"), r#"{"pad_token": null}"#).unwrap()
        });
        assert!(
            load_error(&dir).contains("pad_token"),
            "{}",
            load_error(&dir)
        );
    }
}
