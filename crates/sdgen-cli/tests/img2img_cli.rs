//! Image-to-image through the real `generate` binary (`--init-image`, `--strength`) on the tiny
//! SD 1.5 model in a temporary folder.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_png_close, assert_refused, decode_png, files_in, generate, stderr, testdata, tiny_model};

fn init_png(name: &str) -> String {
    testdata().join("reference/sd15").join(name).display().to_string()
}

/// diffusers' `img2img_s03` case (make_img2img.py): PNDM (the model's own), 10 steps, strength
/// 0.3, guidance 7.5, seed 31.
#[test]
fn img2img_writes_diffusers_image_with_strength_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let init = init_png("img2img_init.png");
    let o = generate(
        &[
            "a lighthouse at dusk",
            "--model",
            &tiny_model(),
            "--seed",
            "31",
            "--steps",
            "10",
            "--init-image",
            &init,
            "--strength",
            "0.3",
            "--json",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON document");
    assert_eq!(result["strength"], 0.3);
    assert_eq!(result["init_image"], init.as_str());
    let png_path = PathBuf::from(result["images"][0]["png"].as_str().unwrap());
    let json_path = PathBuf::from(result["images"][0]["metadata"].as_str().unwrap());
    assert_eq!(files_in(&out), {
        let mut v = vec![png_path.clone(), json_path.clone()];
        v.sort();
        v
    });

    // The pixels are diffusers' (99.5% of channels within 1/255, none over 8/255).
    let (_, w, h) = decode_png(&png_path);
    assert_eq!((w, h), (64, 64));
    assert_png_close(&png_path, &testdata().join("reference/sd15/png/img2img_s03_0.png"));

    // The sidecar records the init image and the strength.
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(meta["extra"]["strength"], 0.3, "{meta}");
    assert_eq!(meta["extra"]["init_image"], init.as_str(), "{meta}");
    assert_eq!(meta["pipeline_type"], "StableDiffusionImg2ImgPipeline (SD 1.5)");
    assert_eq!(meta["steps"], 10);
    assert_eq!(meta["seed"], 31);
    assert!(meta["timings_ms"].get("vae_encoder").is_some(), "{meta}");
    let log = stderr(&o);
    assert!(log.contains("strength 0.3") && log.contains("last 3 of 10 steps"), "{log}");
}

/// The output size is the init image's rounded down to a multiple of 8; the default strength is
/// diffusers' 0.8.
#[test]
fn init_image_size_is_rounded_down_and_strength_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = generate(
        &["x", "--model", &tiny_model(), "--steps", "3", "--init-image", &init_png("img2img_init_70x60.png"), "--json"],
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((result["width"].as_u64(), result["height"].as_u64()), (Some(64), Some(56)));
    assert_eq!(result["strength"], 0.8);
    let (_, w, h) = decode_png(Path::new(result["images"][0]["png"].as_str().unwrap()));
    assert_eq!((w, h), (64, 56));
}

#[test]
fn bad_img2img_input_is_refused_clearly() {
    let model = tiny_model();
    let init = init_png("img2img_init.png");
    let run = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["x", "--model", &model, "--steps", "4"];
        args.extend_from_slice(extra);
        assert_refused(&args, needles);
    };
    run(&["--init-image", &init, "--strength", "1.5"], &["--strength 1.5", "[0, 1]"]);
    run(&["--init-image", &init, "--strength", "-0.1"], &["--strength -0.1", "[0, 1]"]);
    run(&["--init-image", &init, "--strength", "0"], &["--strength 0", "no step"]);
    // The fix names the flags (the engine refers to the fields; a server names its JSON's).
    run(&["--init-image", &init, "--strength", "0.1"], &["--strength 0.1", "raise --strength or --steps"]);
    run(&["--strength", "0.5"], &["--strength", "--init-image"]);

    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "this is a text file, not a picture\n").unwrap();
    let text = text.display().to_string();
    run(&["--init-image", &text], &[&text, "not a PNG, JPEG or WebP image"]);

    let missing = dir.path().join("no-such-image.png").display().to_string();
    run(&["--init-image", &missing], &["--init-image", &missing, "No such file"]);
}
