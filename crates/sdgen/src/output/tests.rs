//! Tests of saving: round trips, no overwrites, no leftovers, unusable folders.

use std::time::{Duration, UNIX_EPOCH};

use super::atomic::tests::names;
use super::png_io::tests::decode_rgb;
use super::*;

/// 2023-11-14 22:13:20 UTC.
fn fixed_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// `save_image`'s path with the clock and failure hook of the test.
fn save_image_at(
    dir: &Path,
    exact: Option<&str>,
    meta: &ImageMetadata,
    rgb: &[u8],
    now: SystemTime,
    hook: &mut dyn FnMut(SaveStep) -> io::Result<()>,
) -> Result<SavedImage> {
    save_png_at(dir, exact, meta, &image_png(meta, rgb)?, now, hook)
}

fn meta() -> ImageMetadata {
    let mut timings_ms = BTreeMap::new();
    timings_ms.insert("denoise".to_string(), 1234.5);
    timings_ms.insert("total".to_string(), 2000.25);
    ImageMetadata {
        model: "sd15".into(),
        pipeline_type: "StableDiffusionPipeline (SD 1.5)".into(),
        memory_optimizations: "attention_slicing,vae_slicing".into(),
        warnings: vec!["low memory".into()],
        failures: vec![],
        prompt: "café 東京".into(),
        negative_prompt: "blurry".into(),
        seed: 42,
        batch_index: 0,
        steps: 30,
        guidance: 7.5,
        scheduler: "euler".into(),
        width: 7,
        height: 3,
        device: "cpu".into(),
        dtype: "f32".into(),
        timings_ms,
        version: "0.1.0".into(),
        extra: serde_json::Map::new(),
    }
}

fn pixels(meta: &ImageMetadata) -> Vec<u8> {
    (0..meta.width * meta.height * 3).map(|i| (i * 37 % 256) as u8).collect()
}

fn no_faults(_: SaveStep) -> io::Result<()> {
    Ok(())
}

#[test]
fn png_and_sidecar_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let m = meta();
    let rgb = pixels(&m);
    let saved = save_image(dir.path(), &m, &rgb).unwrap();

    let png_name = saved.png_path.file_name().unwrap().to_str().unwrap();
    assert!(png_name.ends_with("_42_cafe.png"), "{png_name}");
    assert_eq!(saved.json_path, saved.png_path.with_extension("json"));
    assert_eq!(saved.png_path.parent(), Some(dir.path()));

    let (w, h, decoded) = decode_rgb(&fs::read(&saved.png_path).unwrap());
    assert_eq!((w, h), (7, 3));
    assert_eq!(decoded, rgb);

    let text = read_png_text(&saved.png_path).unwrap();
    assert_eq!(text, [(PARAMETERS_KEYWORD.to_string(), a1111_parameters(&m))]);
    assert_eq!(
        text[0].1,
        "café 東京\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 42, \
         Size: 7x3, Model: sd15, Version: sdgen 0.1.0"
    );

    let json = fs::read_to_string(&saved.json_path).unwrap();
    assert!(json.contains("\n  \"model\": \"sd15\""), "not pretty-printed: {json}");
    assert!(!json.contains("extra"), "empty extra should be left out: {json}");
    let back: ImageMetadata = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);

    assert_eq!(names(dir.path()).len(), 2, "{:?}", names(dir.path()));
}

#[test]
fn extra_fields_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meta();
    m.extra.insert("plan".into(), serde_json::json!({"attention": "sliced", "peak_bytes": 123}));
    let saved = save_image(dir.path(), &m, &pixels(&m)).unwrap();
    let back: ImageMetadata = serde_json::from_slice(&fs::read(&saved.json_path).unwrap()).unwrap();
    assert_eq!(back, m);
}

#[test]
fn existing_files_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let m = meta();
    let stem = "20231114-221320_42_cafe";
    let taken = dir.path().join(format!("{stem}.png"));
    fs::write(&taken, b"precious").unwrap();

    let first = save_image_at(dir.path(), None, &m, &pixels(&m), fixed_time(), &mut no_faults).unwrap();
    assert_eq!(first.png_path, dir.path().join(format!("{stem}-1.png")));
    assert_eq!(first.json_path, dir.path().join(format!("{stem}-1.json")));
    assert_eq!(fs::read(&taken).unwrap(), b"precious");

    // A sidecar left without its PNG also takes its stem, so the pair always matches.
    fs::write(dir.path().join(format!("{stem}-2.json")), b"orphan").unwrap();
    let second = save_image_at(dir.path(), None, &m, &pixels(&m), fixed_time(), &mut no_faults).unwrap();
    assert_eq!(second.png_path, dir.path().join(format!("{stem}-3.png")));
    assert_eq!(second.json_path, dir.path().join(format!("{stem}-3.json")));
    assert_eq!(fs::read(dir.path().join(format!("{stem}-2.json"))).unwrap(), b"orphan");

    assert_eq!(
        names(dir.path()),
        [
            format!("{stem}-1.json"),
            format!("{stem}-1.png"),
            format!("{stem}-2.json"),
            format!("{stem}-3.json"),
            format!("{stem}-3.png"),
            format!("{stem}.png"),
        ]
    );
}

#[test]
fn a_failure_leaves_nothing_behind() {
    for fail_at in [SaveStep::TempsWritten, SaveStep::PngPublished] {
        let dir = tempfile::tempdir().unwrap();
        let m = meta();
        let mut hook = |step: SaveStep| {
            if step == fail_at {
                Err(io::Error::other("injected failure"))
            } else {
                Ok(())
            }
        };
        let err = save_image_at(dir.path(), None, &m, &pixels(&m), fixed_time(), &mut hook).unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert!(names(dir.path()).is_empty(), "{fail_at:?}: {:?}", names(dir.path()));
    }
}

#[test]
fn bad_pixels_are_rejected_before_touching_the_folder() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("out");
    let m = meta();
    let err = save_image(&dir, &m, &pixels(&m)[1..]).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("7x3"), "{err}");
    assert!(!dir.exists());
    let zero = ImageMetadata { width: 0, ..meta() };
    assert!(matches!(save_image(&dir, &zero, &[]), Err(Error::InvalidInput(_))));
}

#[test]
fn save_creates_the_folder_and_leaves_no_temporaries() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("a").join("b");
    let m = meta();
    for _ in 0..3 {
        save_image_at(&dir, None, &m, &pixels(&m), fixed_time(), &mut no_faults).unwrap();
    }
    let all = names(&dir);
    assert_eq!(all.len(), 6, "{all:?}");
    assert!(all.iter().all(|n| !n.starts_with('.') && !n.ends_with(".tmp")), "{all:?}");
}

#[test]
fn check_output_dir_creates_nothing() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("new").join("folder");
    check_output_dir(&dir).unwrap();
    assert!(!parent.path().join("new").exists(), "a check must not create the folder");
    assert!(names(parent.path()).is_empty(), "the write check must clean up: {:?}", names(parent.path()));
    fs::create_dir_all(&dir).unwrap();
    check_output_dir(&dir).unwrap(); // an existing folder is fine
    assert!(names(&dir).is_empty());
}

#[test]
fn check_output_dir_rejects_unusable_folders() {
    // Tests run as root, which permission bits do not stop; a path through a regular file stops
    // everyone.
    let parent = tempfile::tempdir().unwrap();
    let file = parent.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    for dir in [file.join("sub"), file.clone()] {
        let err = check_output_dir(&dir).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("writable output folder"), "{msg}");
        // The field is a reference: a caller names it its own way.
        let named = err.describe(&|f| (f == "output").then_some("--output"));
        assert!(named.contains("writable --output folder"), "{named}");
    }
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

#[test]
fn output_targets_name_files_or_folders() {
    let t = |p: &str| OutputTarget::parse(Path::new(p));
    assert_eq!(t("out").unwrap(), OutputTarget::Folder("out".into()));
    assert_eq!(t("out.d/images").unwrap(), OutputTarget::Folder("out.d/images".into()));
    let file = t("shots/Result.PNG").unwrap();
    assert_eq!(file, OutputTarget::File { dir: "shots".into(), stem: "Result".into() });
    assert_eq!(file.dir(), Path::new("shots"));
    assert_eq!(file.file_stem(0, 1).as_deref(), Some("Result"));
    assert_eq!(file.file_stem(2, 3).as_deref(), Some("Result-3"));
    assert_eq!(t("result.png").unwrap().dir(), Path::new("."));
    for bad in ["result.jpg", "x.JPEG", "y.webp"] {
        let msg = t(bad).unwrap_err().to_string();
        assert!(msg.contains(bad) && msg.contains(".png"), "{msg}");
    }
    assert!(t(".png").is_err());
}

#[test]
fn a_named_file_is_written_once_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let target = OutputTarget::File { dir: dir.path().join("new"), stem: "result".into() };
    target.check(2).unwrap();
    assert!(!dir.path().join("new").exists());
    let m = meta();
    let saved = save_image_to(&target, 1, 2, &m, &pixels(&m)).unwrap();
    assert_eq!(saved.png_path, dir.path().join("new/result-2.png"));
    assert_eq!(saved.json_path, dir.path().join("new/result-2.json"));
    let msg = target.check(2).unwrap_err().to_string();
    assert!(msg.contains("result-2") && msg.contains("never overwritten"), "{msg}");
    let before = fs::read(&saved.png_path).unwrap();
    assert!(save_image_to(&target, 1, 2, &m, &pixels(&m)).is_err());
    assert_eq!(fs::read(&saved.png_path).unwrap(), before);
    assert_eq!(names(&dir.path().join("new")).len(), 2, "nothing else left behind");
}
