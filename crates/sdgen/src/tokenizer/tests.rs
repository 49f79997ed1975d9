use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;

pub(super) const TOKENIZER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/clip-tokenizer");
pub(super) const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/reference/tokens.json");
const MODES: [TokenizerMode; 2] = [TokenizerMode::Transformers5, TokenizerMode::Slow];

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

pub(super) fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
}

/// The reference record of `mode` for one prompt and config (see tools/reference/make_tokens.py:
/// a variant omits slow ids equal to sd15's, "fast" is kept where it differs from slow, "v5" where
/// it differs from "fast").
pub(super) fn reference_record<'a>(case: &'a Value, name: &str, mode: TokenizerMode) -> &'a Value {
    let own = &case[name];
    let slow = if own.get("ids").is_some() { own } else { &case["sd15"] };
    match mode {
        TokenizerMode::Slow => slow,
        TokenizerMode::Transformers5 => own.get("v5").or_else(|| own.get("fast")).unwrap_or(slow),
    }
}

/// Every prompt of the reference, under every config, gives exactly `mode`'s 77 ids and number of
/// dropped tokens.
fn check_against_reference(mode: TokenizerMode) {
    let reference = read_json(Path::new(REFERENCE)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let configs = reference["configs"].as_object().unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() > 300, "the reference should hold a few hundred prompts");
    assert_eq!(configs.len(), 4, "sd15, sdxl2, sdxl2-v4save and flags-synthetic");
    for (name, config) in configs {
        let tok = ClipTokenizer::from_dir_with_mode(&tokenizer_dir(name, tmp.path()), mode).unwrap();
        assert_eq!(tok.mode(), mode);
        assert_eq!(tok.max_length(), config["max_length"].as_u64().unwrap() as usize, "{name}");
        assert_eq!(tok.vocab_size(), config["vocab_size"].as_u64().unwrap() as usize, "{name}");
        let pad_id = config["pad_id"].as_u64().unwrap() as u32;
        assert_eq!(tok.pad_id(), pad_id, "{name}");
        let mut failures = Vec::new();
        for case in cases {
            let prompt = case["prompt"].as_str().unwrap();
            let rec = reference_record(case, name, mode);
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
            "{mode:?}: {} of {} prompts differ:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
    }
}

#[test]
fn matches_transformers5_clip_tokenizer() {
    check_against_reference(TokenizerMode::Transformers5);
}

#[test]
fn matches_transformers4_slow_clip_tokenizer() {
    check_against_reference(TokenizerMode::Slow);
}

/// transformers 5's resolution of added tokens on synthetic folders (see `V5_FOLDERS` in
/// tools/reference/make_tokens.py): the same tokens with the same ids and flags, the same bos, eos
/// and pad ids, and the same ids for the probe prompts.
#[test]
fn transformers5_registers_added_tokens_as_transformers_does() {
    let reference = read_json(Path::new(REFERENCE)).unwrap();
    let folders = reference["v5_folders"].as_object().unwrap();
    assert!(folders.len() >= 7, "the reference should hold the synthetic folders");
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (name, folder) in folders {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(Path::new(TOKENIZER_DIR).join(f), dir.join(f)).unwrap();
        }
        for (file, content) in folder["files"].as_object().unwrap() {
            std::fs::write(dir.join(file), serde_json::to_string_pretty(content).unwrap()).unwrap();
        }
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        let Engine::Fast(fast) = &tok.engine else { unreachable!("the default mode is Transformers5") };
        assert_eq!(&fast.added_token_rows(), folder["added_tokens"].as_array().unwrap(), "{name}");
        let frame = (tok.frame.bos, tok.frame.eos, tok.frame.pad);
        let id = |k: &str| folder[k].as_u64().unwrap() as u32;
        assert_eq!(frame, (id("bos_id"), id("eos_id"), id("pad_id")), "{name}");
        for case in folder["cases"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let mut want = ids_of(&case["ids"]);
            want.resize(tok.max_length(), tok.pad_id());
            let got = tok.encode(prompt).unwrap();
            let want_dropped = (case["n_untruncated"].as_u64().unwrap() as usize).saturating_sub(tok.max_length());
            if got.ids != want || got.dropped_tokens != want_dropped {
                failures.push(format!("{name} {prompt:?}:\n  got  {:?}\n  want {want:?}", got.ids));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn default_mode_is_transformers5() {
    assert_eq!(TokenizerMode::default(), TokenizerMode::Transformers5);
    let tok = ClipTokenizer::from_dir(Path::new(TOKENIZER_DIR)).unwrap();
    assert_eq!(tok.mode(), TokenizerMode::Transformers5);
    // A prompt where the modes differ: transformers 5 keeps U+200B as bytes, slow drops it.
    let slow = ClipTokenizer::from_dir_with_mode(Path::new(TOKENIZER_DIR), TokenizerMode::Slow).unwrap();
    let prompt = "a\u{200b}cat";
    assert_ne!(tok.encode(prompt).unwrap(), slow.encode(prompt).unwrap());
}

#[test]
fn short_prompt_is_framed_and_padded() {
    for mode in MODES {
        let tok = ClipTokenizer::from_dir_with_mode(Path::new(TOKENIZER_DIR), mode).unwrap();
        let t = tok.encode("a photo of a cat").unwrap();
        assert_eq!(&t.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407], "{mode:?}");
        assert!(t.ids[7..].iter().all(|&i| i == 49407), "{mode:?}");
        assert_eq!((t.ids.len(), t.dropped_tokens), (77, 0), "{mode:?}");
        let empty = tok.encode("").unwrap();
        assert_eq!(&empty.ids[..2], &[49406, 49407], "{mode:?}");
        let long = tok.encode(&"cat ".repeat(100)).unwrap();
        assert_eq!((long.ids[76], long.dropped_tokens), (49407, 25), "{mode:?}");
    }
}

fn broken_copy(tmp: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join("broken");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(Path::new(TOKENIZER_DIR).join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

#[test]
fn errors_name_the_file() {
    for mode in MODES {
        let load_error = |dir: &Path| ClipTokenizer::from_dir_with_mode(dir, mode).unwrap_err().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let dir = broken_copy(tmp.path(), |d| std::fs::remove_file(d.join("vocab.json")).unwrap());
        assert!(load_error(&dir).contains("vocab.json"), "{mode:?}: {}", load_error(&dir));

        let dir = broken_copy(tmp.path(), |d| std::fs::write(d.join("merges.txt"), "#version: 0.2\na b c\n").unwrap());
        let err = load_error(&dir);
        assert!(err.contains("merges.txt line 2"), "{mode:?}: {err}");

        let dir = broken_copy(tmp.path(), |d| std::fs::write(d.join("tokenizer_config.json"), "{}").unwrap());
        let err = load_error(&dir);
        assert!(err.contains("tokenizer_config.json") && err.contains("model_max_length"), "{mode:?}: {err}");

        let dir = broken_copy(tmp.path(), |d| std::fs::write(d.join("vocab.json"), "[1, 2]").unwrap());
        assert!(load_error(&dir).contains("vocab.json"), "{mode:?}: {}", load_error(&dir));

        let dir = broken_copy(tmp.path(), |d| {
            std::fs::write(d.join("special_tokens_map.json"), r#"{"pad_token": null}"#).unwrap()
        });
        assert!(load_error(&dir).contains("pad_token"), "{mode:?}: {}", load_error(&dir));
    }
}

/// The two modes read merges.txt as their references do: slow skips the first line whatever it
/// says and stops after 48,894 merges; tokenizers skips `#version` lines only and reads them all.
#[test]
fn merges_are_read_per_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(Path::new(TOKENIZER_DIR).join("merges.txt")).unwrap();
    let body = text.split_once('\n').unwrap().1;
    // Without the header, slow loses the first merge ("i n"), transformers 5 keeps it.
    let dir = broken_copy(tmp.path(), |d| std::fs::write(d.join("merges.txt"), body).unwrap());
    let fast = ClipTokenizer::from_dir_with_mode(&dir, TokenizerMode::Transformers5).unwrap();
    let slow = ClipTokenizer::from_dir_with_mode(&dir, TokenizerMode::Slow).unwrap();
    let full = ClipTokenizer::from_dir(Path::new(TOKENIZER_DIR)).unwrap();
    let words = "ink inn tint pinch inside kin"; // "i n" merged first, before "in</w>" can be
    assert_eq!(fast.encode(words).unwrap(), full.encode(words).unwrap());
    assert_ne!(slow.encode(words).unwrap(), full.encode(words).unwrap());
    // A trailing newline is fine for both; an empty line inside is not, for transformers 5.
    let dir = broken_copy(tmp.path(), |d| std::fs::write(d.join("merges.txt"), format!("{text}\n\n")).unwrap());
    assert!(ClipTokenizer::from_dir_with_mode(&dir, TokenizerMode::Slow).is_ok());
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("merges.txt line 48896"), "{err}");
}

/// Every code point through a reference tokenizer (see `--sweep` in tools/reference/make_tokens.py):
/// lists where Rust's Unicode tables and the reference's disagree. Informational, so ignored:
/// `CLIP_TOKENIZER_SWEEP=/tmp/sweep.txt cargo test -p sdgen --lib sweep -- --ignored --nocapture`
/// (with `CLIP_TOKENIZER_SWEEP_MODE=slow` for a sweep of the slow tokenizer).
#[test]
#[ignore]
fn sweep_all_code_points() {
    let path = std::env::var("CLIP_TOKENIZER_SWEEP").expect("set CLIP_TOKENIZER_SWEEP");
    let mode = match std::env::var("CLIP_TOKENIZER_SWEEP_MODE").as_deref() {
        Ok("slow") => TokenizerMode::Slow,
        _ => TokenizerMode::Transformers5,
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let tok = ClipTokenizer::from_dir_with_mode(Path::new(TOKENIZER_DIR), mode).unwrap();
    let mut differ = Vec::new();
    for line in text.lines() {
        let mut fields = line.split(' ');
        let cp = u32::from_str_radix(fields.next().unwrap(), 16).unwrap();
        let want: Vec<u32> = fields.map(|f| f.parse().unwrap()).collect();
        let Some(c) = char::from_u32(cp) else { continue };
        let mut got = vec![tok.frame.bos];
        got.extend(tok.content_ids(&format!("a{c}b {c}{c}x")).unwrap());
        got.push(tok.frame.eos);
        if got != want {
            differ.push(cp);
        }
    }
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for cp in &differ {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == *cp => *end = *cp,
            _ => ranges.push((*cp, *cp)),
        }
    }
    let shown: Vec<String> = ranges.iter().map(|(a, b)| format!("{a:04X}-{b:04X}")).collect();
    println!("{mode:?}: {} code points differ, in ranges: {}", differ.len(), shown.join(" "));
}
