//! Folders with a `tokenizer.json`, as transformers 5's `save_pretrained` writes them, against
//! `testdata/tokenizer-json/ids.json` (see `tools/reference/make_tokenizer_json.py` for the
//! folders and how each reference read them).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::tests::{ids_of, reference_record, REFERENCE, TOKENIZER_DIR};
use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tokenizer-json");

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string(value).unwrap()).unwrap();
}

/// testdata/clip-tokenizer's merges.txt as tokenizer.json writes merges: `[a, b]` pairs.
fn clip_merge_pairs() -> Value {
    let text = std::fs::read_to_string(Path::new(TOKENIZER_DIR).join("merges.txt")).unwrap();
    let pairs = text.lines().skip(1).map(|l| {
        let (a, b) = l.split_once(' ').unwrap();
        json!([a, b])
    });
    Value::Array(pairs.collect())
}

/// Lays out the folder `name` of ids.json's results in `tmp` (the committed fixtures are used as
/// they are): the same folders the reference script tokenized.
fn folder(name: &str, tmp: &Path) -> PathBuf {
    if let Some(config) = name.strip_prefix("full/") {
        // The skeleton refilled with the vocabulary and merges it was saved from.
        let dir = tmp.join("full").join(config);
        std::fs::create_dir_all(&dir).unwrap();
        let src = fixture(name);
        std::fs::copy(src.join("tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
        let mut tj = read_json(&src.join("tokenizer.skeleton.json")).unwrap();
        tj["model"]["vocab"] = read_json(&Path::new(TOKENIZER_DIR).join("vocab.json")).unwrap();
        tj["model"]["merges"] = clip_merge_pairs();
        write_json(&dir.join("tokenizer.json"), &tj);
        return dir;
    }
    let Some((base, derived)) = name.split_once('+') else { return fixture(name) };
    let dir = tmp.join(name);
    copy_dir(&fixture(base), &dir);
    match derived {
        "merges-as-strings" => {
            let path = dir.join("tokenizer.json");
            let mut tj = read_json(&path).unwrap();
            let strings: Vec<Value> = tj["model"]["merges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| json!(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
                .collect();
            tj["model"]["merges"] = Value::Array(strings);
            write_json(&path, &tj);
        }
        "with-vocab-files" => {
            for f in ["vocab.json", "merges.txt"] {
                std::fs::copy(Path::new(TOKENIZER_DIR).join(f), dir.join(f)).unwrap();
            }
        }
        other => panic!("unknown derived folder {other}"),
    }
    dir
}

/// The expected records of ids.json result `key` ("FOLDER/MODE"), one per prompt, its base's
/// filled in.
fn expected(ids: &Value, tokens: &Value, key: &str) -> Vec<Value> {
    let result = &ids["results"][key];
    let n_extra = ids["extra_prompts"].as_array().unwrap().len();
    let mut records: Vec<Value> = match result["base"].as_str() {
        None => vec![Value::Null; tokens["cases"].as_array().unwrap().len() + n_extra],
        Some(base) => match base.strip_prefix("tokens.json:") {
            Some(config_mode) => {
                let (config, mode) = config_mode.split_once('/').unwrap();
                let mode = if mode == "slow" { TokenizerMode::Slow } else { TokenizerMode::Transformers5 };
                let cases = tokens["cases"].as_array().unwrap();
                let mut r: Vec<Value> = cases.iter().map(|c| reference_record(c, config, mode).clone()).collect();
                r.resize(r.len() + n_extra, Value::Null);
                r
            }
            None => expected(ids, tokens, base),
        },
    };
    for (i, record) in result["cases"].as_object().unwrap() {
        records[i.parse::<usize>().unwrap()] = record.clone();
    }
    records
}

/// Every folder of ids.json in both modes: pad id, vocabulary size, and the ids and number of
/// dropped tokens of every prompt (tokens.json's and the extra ones).
#[test]
fn tokenizer_json_folders_match_transformers() {
    let ids = read_json(&fixture("ids.json")).unwrap();
    let tokens = read_json(Path::new(REFERENCE)).unwrap();
    let prompts: Vec<&str> = tokens["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["prompt"].as_str().unwrap())
        .chain(ids["extra_prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()))
        .collect();
    assert_eq!(ids["n_tokens_json_prompts"].as_u64().unwrap() as usize, tokens["cases"].as_array().unwrap().len());
    let results = ids["results"].as_object().unwrap();
    assert!(results.len() >= 16, "tiny folders, derived ones and the four full-size configs, in two modes");
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (key, result) in results {
        let (name, mode) = key.rsplit_once('/').unwrap();
        let mode = if mode == "slow" { TokenizerMode::Slow } else { TokenizerMode::Transformers5 };
        let dir = folder(name, tmp.path());
        let tok = ClipTokenizer::from_dir_with_mode(&dir, mode).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(tok.pad_id(), result["pad_id"].as_u64().unwrap() as u32, "{key}");
        assert_eq!(tok.vocab_size(), result["vocab_size"].as_u64().unwrap() as usize, "{key}");
        let records = expected(&ids, &tokens, key);
        assert_eq!(records.len(), prompts.len(), "{key}");
        for (prompt, record) in prompts.iter().zip(&records) {
            assert!(record.is_object(), "{key}: no record for {prompt:?}");
            let mut want = ids_of(&record["ids"]);
            want.resize(tok.max_length(), tok.pad_id());
            let want_dropped = (record["n_untruncated"].as_u64().unwrap() as usize).saturating_sub(tok.max_length());
            let got = tok.encode(prompt).unwrap();
            if got.ids != want || got.dropped_tokens != want_dropped {
                failures.push(format!(
                    "{key} {prompt:?}:\n  got  {:?} dropped {}\n  want {want:?} dropped {want_dropped}",
                    got.ids, got.dropped_tokens
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Which files each mode takes the vocabulary from when a folder has both forms (the tiny
/// tokenizer.json beside the full-size vocab.json and merges.txt).
#[test]
fn transformers5_prefers_tokenizer_json_and_slow_the_vocab_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = folder("tiny-sd15+with-vocab-files", tmp.path());
    let fast = ClipTokenizer::from_dir(&dir).unwrap();
    let slow = ClipTokenizer::from_dir_with_mode(&dir, TokenizerMode::Slow).unwrap();
    assert_eq!((fast.vocab_size(), slow.vocab_size()), (1014, 49408));
    // The slow tokenizer still takes tokenizer.json's added tokens: bos is the tiny vocabulary's.
    assert_eq!(slow.encode("").unwrap().ids[..2], [1012, 1013]);
    // Alone, either file set serves both modes.
    let only_json = fixture("tiny-sd15");
    for mode in MODES {
        assert_eq!(ClipTokenizer::from_dir_with_mode(&only_json, mode).unwrap().vocab_size(), 1014, "{mode:?}");
    }
}

const MODES: [TokenizerMode; 2] = [TokenizerMode::Transformers5, TokenizerMode::Slow];

#[test]
fn missing_and_broken_tokenizer_json_errors_name_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    for mode in MODES {
        let load_error = |dir: &Path| ClipTokenizer::from_dir_with_mode(dir, mode).unwrap_err().to_string();

        // Neither form: the folder, tokenizer.json, vocab.json and merges.txt are all named.
        let dir = tmp.path().join("config-only");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(fixture("tiny-sd15/tokenizer_config.json"), dir.join("tokenizer_config.json")).unwrap();
        let err = load_error(&dir);
        for name in [dir.to_str().unwrap(), "tokenizer.json", "vocab.json", "merges.txt"] {
            assert!(err.contains(name), "{mode:?}: {err}");
        }
        // Half of the old form is no form either.
        std::fs::copy(Path::new(TOKENIZER_DIR).join("vocab.json"), dir.join("vocab.json")).unwrap();
        let err = load_error(&dir);
        assert!(err.contains("tokenizer.json") && err.contains("no merges.txt"), "{mode:?}: {err}");

        let missing = tmp.path().join("no-such-folder");
        assert!(load_error(&missing).contains("no-such-folder"), "{mode:?}");

        let broken = |edit: &dyn Fn(&mut Value)| {
            let dir = tmp.path().join("broken");
            let _ = std::fs::remove_dir_all(&dir);
            copy_dir(&fixture("tiny-sd15"), &dir);
            let mut tj = read_json(&dir.join("tokenizer.json")).unwrap();
            edit(&mut tj);
            write_json(&dir.join("tokenizer.json"), &tj);
            load_error(&dir)
        };
        let err = broken(&|tj| tj["model"]["merges"][3] = json!("a b c"));
        assert!(err.contains("tokenizer.json") && err.contains("merges entry 3"), "{mode:?}: {err}");
        let err = broken(&|tj| tj["model"]["merges"][0] = json!(["zzz-not-in-vocab", "q"]));
        assert!(err.contains("tokenizer.json") && err.contains("disagree"), "{mode:?}: {err}");
        let err = broken(&|tj| tj["model"]["type"] = json!("WordPiece"));
        assert!(err.contains("tokenizer.json") && err.contains("WordPiece"), "{mode:?}: {err}");
        let err = broken(&|tj| tj["model"]["vocab"] = json!(["a", "b"]));
        assert!(err.contains("tokenizer.json") && err.contains("model.vocab"), "{mode:?}: {err}");
        let err = broken(&|tj| tj["added_tokens"][0]["id"] = json!("x"));
        assert!(err.contains("tokenizer.json") && err.contains("added_tokens"), "{mode:?}: {err}");
    }
}
