//! Memory over a stage's life on the CPU: a dropped stage gives its memory back, and repeated
//! generations do not grow the process.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::testdata;
use sdgen::loading::ModelFolder;
use sdgen::pipeline::{txt2img, Request, Runtime};
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};

const MB: i64 = 1 << 20;

/// The tests measure the whole process, so they must not run at the same time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rss() -> i64 {
    sdgen_memory::cleanup_memory(false);
    sdgen_memory::process_rss_bytes() as i64
}

/// 20 generations in one process: RSS after each stays within 32 MB of the value after the first.
#[test]
fn repeated_generations_do_not_leak() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = ModelFolder::open(&testdata().join("tiny-sd15")).unwrap();
    let req = Request { prompt: "a lighthouse at dusk".into(), n: 2, seed: 1, steps: Some(3), ..Default::default() };
    let mut after = Vec::new();
    for _ in 0..20 {
        txt2img(&model, &req, &Runtime::cpu(), &mut |_| {}).unwrap();
        after.push(rss());
    }
    let drift = after.iter().map(|r| (r - after[0]).abs()).max().unwrap();
    assert!(drift <= 32 * MB, "RSS drifted by {} MB over 20 generations: {:?}", drift / MB, after);
}

/// A full-size CLIP ViT-L text encoder (random weights, 123 M parameters) is loaded from its
/// file, used and dropped as the pipeline's text-encoder stage does: at least 90% of its weight
/// bytes are given back.
#[test]
fn a_dropped_text_encoder_gives_its_memory_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cfg = ClipTextConfig::vit_l();
    {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        drop(ClipTextModel::new(&cfg, false, vb.pp("text_model")).unwrap());
        varmap.save(&path).unwrap();
    }
    let weight_bytes = std::fs::metadata(&path).unwrap().len() as i64;
    let before = rss();
    let peak_during;
    {
        let files = vec![path.clone()];
        // SAFETY: the file is ours and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap();
        let enc = ClipTextModel::new(&cfg, false, vb).unwrap();
        let ids = Tensor::zeros((1, 77), DType::U32, &Device::Cpu).unwrap();
        enc.forward(&ids).unwrap();
        peak_during = sdgen_memory::process_rss_bytes() as i64;
    }
    let after = rss();
    let held = peak_during - before;
    let returned = peak_during - after;
    assert!(held >= weight_bytes * 9 / 10, "the encoder held only {} MB of its {} MB", held / MB, weight_bytes / MB);
    assert!(
        returned >= weight_bytes * 9 / 10,
        "only {} MB of the encoder's {} MB were given back (RSS {} → {} → {} MB)",
        returned / MB,
        weight_bytes / MB,
        before / MB,
        peak_during / MB,
        after / MB
    );
}

/// Loading a full-size SD 1.5 UNet stored in f16 into f16 on the CPU: the process peak rises by
/// at most 1.15× the file's size (file pages counted). Needs a full-size folder (e.g. written by
/// `sdgen-bench --dtype f16 --model-dir DIR`): `SDGEN_FULLSIZE_SD15=DIR cargo test -p sdgen
/// --test memory_lifecycle -- --ignored`.
#[test]
#[ignore]
fn loading_a_full_size_unet_stays_near_its_file_size() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::path::PathBuf::from(std::env::var("SDGEN_FULLSIZE_SD15").expect("SDGEN_FULLSIZE_SD15=DIR"));
    let model = ModelFolder::open(&dir).unwrap();
    let weights = model.weights("unet").unwrap();
    let file_bytes: u64 = weights.headers.iter().map(|h| h.file_bytes).sum();
    let cfg: sdgen_models::unet::UNetConfig = model.config("unet", "config.json").unwrap();
    rss();
    let peak = sdgen_memory::StagePeak::start("load");
    let unet =
        sdgen_models::unet::UNet2DConditionModel::new(&cfg, weights.var_builder(DType::F16, &Device::Cpu).unwrap())
            .unwrap();
    let stage = peak.finish();
    drop(unet);
    let rise = stage.peak_rss_bytes.saturating_sub(stage.before.process_rss_bytes);
    eprintln!(
        "UNet file {} MB; peak rose {} MB ({:.2}x) via {:?}",
        file_bytes >> 20,
        rise >> 20,
        rise as f64 / file_bytes as f64,
        stage.peak_source
    );
    assert!(
        rise as f64 <= 1.15 * file_bytes as f64,
        "loading raised the peak by {:.2}x the file",
        rise as f64 / file_bytes as f64
    );
}
