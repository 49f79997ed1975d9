//! `--lora`: LoRAs on the tiny SD 1.5 and SDXL against diffusers' images with the same LoRAs
//! fused (`testdata/reference/lora/png`, `tools/reference/make_lora.py`), recorded in the
//! sidecar and as A1111's `<lora:name:scale>`; from a local hub; and the refusals (exit 2,
//! nothing written).

mod common;

use std::path::Path;

use common::{
    assert_in_order, assert_png_close, assert_refused, generate_from_hub, hub_server, run_json, sidecar, stderr,
    testdata, tiny_model,
};

fn lora(name: &str) -> String {
    testdata().join("lora").join(format!("{name}.safetensors")).display().to_string()
}

fn sdxl() -> String {
    testdata().join("tiny-sdxl").display().to_string()
}

fn png_of(result: &serde_json::Value) -> std::path::PathBuf {
    result["images"][0]["png"].as_str().unwrap().into()
}

fn parameters(png: &Path) -> String {
    let text = sdgen::output::read_png_text(png).unwrap();
    text.into_iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1
}

#[test]
fn a_kohya_lora_makes_diffusers_image_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let arg = format!("{}:0.8", lora("sd15_kohya"));
    let (result, log) = run_json(
        &["a lighthouse at dusk", "--model", &tiny_model(), "--seed", "42", "--steps", "10", "--lora", &arg, "--json"],
        &out,
    );
    let png = png_of(&result);
    assert_png_close(&png, &testdata().join("reference/lora/png/sd15_kohya_0.png"));
    assert_in_order(&log, &["LoRA sd15_kohya (", "kohya format) at scale 0.8", "in the unet", "Generating"]);
    let meta = sidecar(&result);
    let loras = meta["extra"]["loras"].as_array().expect("loras in the sidecar");
    assert_eq!(loras.len(), 1, "{meta}");
    assert_eq!((loras[0]["name"].as_str(), loras[0]["scale"].as_f64()), (Some("sd15_kohya"), Some(0.8)));
    assert_eq!(loras[0]["format"], "kohya");
    assert_eq!(loras[0]["source"].as_str(), Some(lora("sd15_kohya").as_str()));
    assert!(loras[0]["modules"]["text_encoder"].as_u64().unwrap() > 0, "{meta}");
    assert_eq!(meta["prompt"], "a lighthouse at dusk");
    let params = parameters(&png);
    assert!(params.starts_with("a lighthouse at dusk <lora:sd15_kohya:0.8>\n"), "{params}");
}

#[test]
fn loras_repeat_and_add_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (a, b) = (format!("{}:0.8", lora("sd15_peft")), format!("{}:0.5", lora("sd15_kohya")));
    let (result, _) = run_json(
        &[
            "a lighthouse at dusk",
            "--model",
            &tiny_model(),
            "--seed",
            "7",
            "--steps",
            "10",
            "--lora",
            &a,
            "--lora",
            &b,
            "--json",
        ],
        &out,
    );
    let png = png_of(&result);
    assert_png_close(&png, &testdata().join("reference/lora/png/sd15_both_0.png"));
    let formats: Vec<_> =
        sidecar(&result)["extra"]["loras"].as_array().unwrap().iter().map(|l| l["format"].clone()).collect();
    assert_eq!(formats, ["diffusers/PEFT", "kohya"]);
    let params = parameters(&png);
    assert!(params.starts_with("a lighthouse at dusk <lora:sd15_peft:0.8> <lora:sd15_kohya:0.5>\n"), "{params}");
}

#[test]
fn sdxl_takes_a_peft_lora_for_both_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // No scale: 1 would be the LoRA as trained; the reference fused it at 0.8.
    let arg = format!("{}:0.8", lora("sdxl_peft"));
    let (result, log) = run_json(
        &["a lighthouse at dusk", "--model", &sdxl(), "--seed", "42", "--steps", "8", "--lora", &arg, "--json"],
        &out,
    );
    assert_png_close(&png_of(&result), &testdata().join("reference/lora/png/sdxl_peft_0.png"));
    assert!(log.contains("in the text_encoder_2"), "{log}");
}

#[test]
fn a_lora_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    // A LoRA repo as diffusers' trainers push them: the file under its diffusers name.
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(lora("sdxl_kohya"), repo.join("pytorch_lora_weights.safetensors")).unwrap();
    std::fs::write(repo.join("README.md"), "a style\n").unwrap();
    let server = hub_server(&[("someone/tiny-style", repo.to_str().unwrap())]);
    let out = dir.path().join("out");
    let o = generate_from_hub(
        &[
            "a lighthouse at dusk",
            "--model",
            &sdxl(),
            "--seed",
            "42",
            "--steps",
            "8",
            "--lora",
            "someone/tiny-style:0.8",
            "--json",
        ],
        &out,
        &server.endpoint(),
        &dir.path().join("hf"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let result: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_png_close(&png_of(&result), &testdata().join("reference/lora/png/sdxl_kohya_0.png"));
    let meta = sidecar(&result);
    assert_eq!(meta["extra"]["loras"][0]["source"], "someone/tiny-style");
    // Named after the repo, not diffusers' generic file name.
    assert_eq!(meta["extra"]["loras"][0]["name"], "tiny-style");
    assert!(parameters(&png_of(&result)).contains("<lora:tiny-style:0.8>"));
}

#[test]
fn bad_loras_are_refused_with_nothing_written() {
    let model = tiny_model();
    // A LoRA for SDXL given to SD 1.5: both families named.
    let sdxl_lora = lora("sdxl_kohya");
    assert_refused(
        &["a cat", "--model", &model, "--lora", &sdxl_lora],
        &["--lora", "sdxl_kohya.safetensors is a LoRA for Stable Diffusion XL", "(Stable Diffusion 1.5)"],
    );
    // The other way round.
    assert_refused(
        &["a cat", "--model", &sdxl(), "--lora", &lora("sd15_peft")],
        &["a LoRA for Stable Diffusion 1.5", "(Stable Diffusion XL)"],
    );
    // A scale that is not a number.
    let bad_scale = format!("{}:strong", lora("sd15_kohya"));
    assert_refused(
        &["a cat", "--model", &model, "--lora", &bad_scale],
        &["--lora", "the scale `strong` is not a number"],
    );
    // A file that does not exist.
    assert_refused(
        &["a cat", "--model", &model, "--lora", "/no/such/style.safetensors:0.5"],
        &["--lora", "no such file"],
    );

    // A LoRA whose keys match no module: an error naming the file and its keys, not a no-op.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elsewhere.safetensors");
    write_lora(
        &path,
        &[
            ("lora_unet_some_other_net_to_q.lora_down.weight", &[4, 8]),
            ("lora_unet_some_other_net_to_q.lora_up.weight", &[8, 4]),
        ],
    );
    assert_refused(
        &["a cat", "--model", &model, "--lora", path.to_str().unwrap()],
        &["elsewhere.safetensors", "none of its 1 modules", "lora_unet_some_other_net_to_q"],
    );
    // A LoRA for SD 3.5's transformer, or anything else that is no LoRA: its keys named.
    write_lora(&path, &[("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", &[4, 8])]);
    assert_refused(&["a cat", "--model", &model, "--lora", path.to_str().unwrap()], &["is not a LoRA sdgen reads"]);
}

/// A safetensors file of zero F32 tensors.
fn write_lora(path: &Path, tensors: &[(&str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut at = 0;
    for (name, shape) in tensors {
        let bytes = 4 * shape.iter().product::<usize>();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let head = serde_json::to_vec(&header).unwrap();
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.resize(out.len() + at, 0);
    std::fs::write(path, out).unwrap();
}
