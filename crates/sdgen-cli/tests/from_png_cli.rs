//! `--from-png`: an image this tool wrote is made again byte for byte (from its `parameters` text
//! and sidecar, and from the text alone), flags given win, an A1111 image's settings are taken,
//! and files that hold no settings are refused (exit 2, nothing written).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_refused, run_json, sidecar, testdata, tiny_model};

fn png_of(result: &serde_json::Value) -> PathBuf {
    result["images"][0]["png"].as_str().unwrap().into()
}

fn first_run(dir: &Path) -> (PathBuf, serde_json::Value) {
    let lora = format!("{}:0.8", testdata().join("lora/sd15_kohya.safetensors").display());
    let (result, _) = run_json(
        &[
            "a lighthouse, (stormy:1.2) sea",
            "--model",
            &tiny_model(),
            "--negative",
            "blurry",
            "--seed",
            "5",
            "--steps",
            "3",
            "--guidance",
            "6.5",
            "--sampler",
            "Euler a",
            "--lora",
            &lora,
            "--json",
        ],
        &dir.join("first"),
    );
    (png_of(&result), sidecar(&result))
}

#[test]
fn an_image_of_this_tool_is_made_again_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (png, meta) = first_run(dir.path());
    let again = |out: &str, extra: &[&str]| {
        let mut args = vec!["--from-png", png.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        run_json(&args, &dir.path().join(out))
    };
    // With its sidecar beside it: the LoRA's source, the model as named, the unrounded values.
    let (result, _) = again("second", &[]);
    assert_eq!(std::fs::read(png_of(&result)).unwrap(), std::fs::read(&png).unwrap(), "same bytes");
    let second = sidecar(&result);
    for key in ["prompt", "negative_prompt", "seed", "steps", "guidance", "scheduler", "model", "width"] {
        assert_eq!(second[key], meta[key], "{key}");
    }
    assert_eq!(second["extra"]["loras"], meta["extra"]["loras"]);
    // A flag given wins: another seed, the rest the image's.
    let (result, _) = again("third", &["--seed", "6"]);
    let third = sidecar(&result);
    assert_eq!((third["seed"].as_u64(), third["steps"].as_u64()), (Some(6), Some(3)));
    assert_ne!(std::fs::read(png_of(&result)).unwrap(), std::fs::read(&png).unwrap());
}

#[test]
fn the_text_alone_is_enough_for_an_image_without_loras() {
    let dir = tempfile::tempdir().unwrap();
    let (result, _) = run_json(
        &[
            "a lighthouse at dusk",
            "--model",
            &tiny_model(),
            "--seed",
            "9",
            "--steps",
            "2",
            "--sampler",
            "ddim",
            "--json",
        ],
        &dir.path().join("first"),
    );
    let png = png_of(&result);
    std::fs::remove_file(png.with_extension("json")).unwrap();
    let (again, log) = run_json(&["--from-png", png.to_str().unwrap(), "--json"], &dir.path().join("second"));
    assert_eq!(std::fs::read(png_of(&again)).unwrap(), std::fs::read(&png).unwrap(), "same bytes: {log}");
}

/// A realistic A1111 1.10 image's settings: its checkpoint name means nothing here (refused,
/// naming --model), and with --model given the rest is taken: prompt without the LoRA tag (its
/// file beside the PNG), negative prompt, sampler with A1111's separate Karras schedule, seed,
/// size, steps, CFG, clip skip.
#[test]
fn an_a1111_image_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = "a lighthouse at dusk, <lora:sd15_kohya:0.6>\nNegative prompt: (worst quality:1.4), lowres\n\
        Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x48, \
        Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, \
        Lora hashes: \"sd15_kohya: 7c6b3ef0b2\", Version: v1.10.1";
    let png = dir.path().join("a1111.png");
    std::fs::write(&png, sdgen::output::encode_png(&[128; 8 * 8 * 3], 8, 8, &[("parameters", text)]).unwrap()).unwrap();
    assert_refused(&["--from-png", png.to_str().unwrap()], &["its model `v1-5-pruned-emaonly`", "pass --model"]);
    // The LoRA tag names a file A1111 keeps in its own folder: one beside the PNG is taken.
    assert_refused(
        &["--from-png", png.to_str().unwrap(), "--model", &tiny_model()],
        &["<lora:sd15_kohya:0.6>", "sd15_kohya.safetensors", "pass --lora PATH:0.6"],
    );
    std::fs::copy(testdata().join("lora/sd15_kohya.safetensors"), dir.path().join("sd15_kohya.safetensors")).unwrap();
    let (result, _) =
        run_json(&["--from-png", png.to_str().unwrap(), "--model", &tiny_model(), "--json"], &dir.path().join("out"));
    let meta = sidecar(&result);
    assert_eq!(meta["prompt"], "a lighthouse at dusk,");
    assert_eq!(meta["negative_prompt"], "(worst quality:1.4), lowres");
    assert_eq!(
        (meta["seed"].as_u64(), meta["steps"].as_u64(), meta["guidance"].as_f64()),
        (Some(1234), Some(3), Some(6.5))
    );
    assert_eq!((meta["width"].as_u64(), meta["height"].as_u64()), (Some(64), Some(48)));
    assert_eq!((meta["scheduler"].as_str(), meta["extra"]["clip_skip"].as_u64()), (Some("dpm++2m-karras"), Some(2)));
    assert_eq!(
        (meta["extra"]["loras"][0]["name"].as_str(), meta["extra"]["loras"][0]["scale"].as_f64()),
        (Some("sd15_kohya"), Some(0.6))
    );
}

#[test]
fn files_without_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare.png");
    std::fs::write(&bare, sdgen::output::encode_png(&[0; 12], 2, 2, &[("Software", "x")]).unwrap()).unwrap();
    assert_refused(&["--from-png", bare.to_str().unwrap()], &["bare.png", "no `parameters` text chunk"]);
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "a lighthouse").unwrap();
    assert_refused(&["--from-png", text.to_str().unwrap()], &["notes.png", "not a PNG"]);
    let missing = dir.path().join("missing.png");
    assert_refused(&["--from-png", missing.to_str().unwrap()], &["missing.png"]);
}
