//! The MultiDiffusion hires pass on the tiny SDXL (native size 64², 8 latent cells): with one
//! tile it is the untiled pass bit for bit; with several its tiles leave no seam.

use super::*;
use crate::pipeline::{hires_pass, resolve_hires, GeneratedImage, Progress, Request, Runtime};

fn tiny_sdxl() -> ModelFolder {
    ModelFolder::open(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sdxl"))).unwrap()
}

/// A smooth picture to rework (as an upscaled image is): slow sines, a different phase per
/// channel.
fn picture(width: usize, height: usize) -> GeneratedImage {
    let rgb8: Vec<u8> = (0..height * width * 3)
        .map(|i| {
            let (c, x, y) = ((i % 3) as f32, ((i / 3) % width) as f32, (i / 3 / width) as f32);
            (127.5 + 100.0 * (x / 9.0 + c).sin() * (y / 13.0 - c).cos()).round() as u8
        })
        .collect();
    GeneratedImage { index: 0, seed: 7, pixels: rgb8.iter().map(|&v| v as f32 / 255.0).collect(), rgb8 }
}

/// The hires pass at `width × height` (strength 0.5 of 4 steps, guidance 5: CFG per tile) over
/// [`picture`], denoised in `tiles`, with the progress notes it printed.
fn pass(
    model: &ModelFolder,
    width: usize,
    height: usize,
    tiles: Option<DenoiseTiles>,
) -> (GeneratedImage, Vec<String>) {
    let req = Request { prompt: "a lighthouse at dusk".into(), n: 1, seed: 7, steps: Some(4), ..Default::default() };
    let mut plan = resolve_hires(model, &req, width, height, 0.5, tiles.is_some()).unwrap();
    plan.settings.denoise_tiles = tiles;
    let mut notes = Vec::new();
    let mut progress = |p: Progress| {
        if let Progress::Note(n) = p {
            notes.push(n.to_string())
        }
    };
    let image = picture(width, height);
    let g = hires_pass(model, &req, &plan, &[image], "hires_", &Runtime::cpu(), &mut progress).unwrap();
    (g.images.into_iter().next().unwrap(), notes)
}

/// Where MultiDiffusion is well defined with a single tile (the latent no larger than one), it
/// is the untiled image-to-image pass, bit for bit: the window is 1 everywhere and the blend the
/// identity.
#[test]
fn one_tile_is_the_untiled_pass_bit_for_bit() {
    let model = tiny_sdxl();
    let native = DenoiseTiles::native(&model).unwrap();
    assert_eq!(native, DenoiseTiles { tile: 8, overlap: 2, scale: 8 }, "the tiny SDXL's sample_size, 64 px");
    for (w, h) in [(64, 64), (64, 32)] {
        let (tiled, notes) = pass(&model, w, h, Some(native));
        let (untiled, plain_notes) = pass(&model, w, h, None);
        assert!(notes.iter().any(|n| n.contains("MultiDiffusion: 1 tile of")), "{notes:?}");
        assert!(!plain_notes.iter().any(|n| n.contains("MultiDiffusion")), "{plain_notes:?}");
        assert_eq!(tiled.pixels, untiled.pixels, "{w}x{h}");
        assert_eq!(tiled.rgb8, untiled.rgb8, "{w}x{h}");
    }
}

/// The denoising loop of an image-to-image pass over a `side × side` latent (a smooth picture
/// noised to step 4 of 8, the tiny SDXL's Euler, guidance 5), denoised in `tiles`: the latents
/// it leaves, `[1, 4, side, side]`.
fn denoised(model: &ModelFolder, side: usize, tiles: Option<DenoiseTiles>) -> Tensor {
    use super::super::conditioning::{encode_prompts, ImageSize};
    use super::super::stages::{denoise, Guide, StageLog};
    use crate::rng::batch::BatchNoise;
    let px = side * 8;
    let req = Request {
        prompt: "a lighthouse at dusk".into(),
        n: 1,
        seed: 7,
        steps: Some(8),
        width: Some(px),
        height: Some(px),
        ..Default::default()
    };
    let settings = crate::pipeline::resolve(model, &req).unwrap();
    let rt = Runtime::cpu();
    let (mut log, mut warnings) = (StageLog::default(), Vec::new());
    let size = ImageSize { height: px, width: px };
    let cond = encode_prompts(model, &req, true, size, "", &rt, &mut log, &mut warnings, &mut |_| {}).unwrap();
    let mut scheduler = crate::pipeline::build_scheduler(model, settings.scheduler, 8, px, px).unwrap();
    let smooth: Vec<f32> = (0..4 * side * side)
        .map(|i| {
            let (c, x, y) = ((i / (side * side)) as f32, (i % side) as f32, ((i / side) % side) as f32);
            (x / 5.0 + c).sin() * (y / 7.0 - c).cos()
        })
        .collect();
    let smooth = Tensor::from_vec(smooth, (1, 4, side, side), &Device::Cpu).unwrap();
    let mut generators = BatchNoise::for_batch(7, 1);
    let noise = generators.randn(&[1, 4, side, side], DType::F32, &Device::Cpu).unwrap();
    let latents = scheduler.add_noise(&smooth, &noise, 4).unwrap();
    let guide = Guide { scale: settings.guidance, skip_layers: None, steps: 8, tiles };
    denoise("unet", model, scheduler.as_mut(), 4..8, latents, &cond, &guide, &mut generators, &rt, &mut |_| {}).unwrap()
}

/// Mean |difference| between horizontally adjacent cells of `[1, c, h, w]` `t`, per pair column
/// `x` (cells `x` and `x + 1`), over channels and rows: `[w − 1]`.
fn column_gradients(t: &Tensor) -> Vec<f32> {
    let w = t.dim(3).unwrap();
    let d = (t.narrow(3, 1, w - 1).unwrap() - t.narrow(3, 0, w - 1).unwrap()).unwrap().abs().unwrap();
    d.mean_keepdim(1).unwrap().mean_keepdim(2).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// The seam ratio along one axis: mean gradient over the pairs that straddle a tile edge inside
/// the latent (`edges`: a tile starts or ends there) divided by the mean over all other pairs.
fn seam_ratio(grads: &[f32], edges: &[usize]) -> f32 {
    let (mut seam, mut rest) = (Vec::new(), Vec::new());
    for (x, &g) in grads.iter().enumerate() {
        if edges.contains(&(x + 1)) {
            seam.push(g)
        } else {
            rest.push(g)
        }
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    mean(&seam) / mean(&rest)
}

/// The tile edges inside a latent side of `len` cells.
fn tile_edges(tiles: DenoiseTiles, len: usize) -> Vec<usize> {
    let size = tiles.tile.min(len);
    let starts = tile_starts(len, tiles.tile, tiles.overlap);
    starts.iter().flat_map(|&s| [s, s + size]).filter(|&e| e > 0 && e < len).collect()
}

/// Seams, measured as the VAE tiling test measures them, on the latents the denoising loop
/// leaves (what MultiDiffusion makes; the VAE then decodes them whole or in its own tiles): the
/// gradient across the tile edges against everywhere else, horizontally and vertically, for the
/// tiled loop, the untiled loop over the same pairs, and tiles stitched without overlap or
/// windows, which the measure must see. A 48² latent (384² px): 8 × 8 tiles of 8² with the
/// windows, 6 × 6 abutting ones without. The tiny model's random weights leave noise-like latents
/// whose neighbours differ a lot everywhere, so seams stand out less than on a real model: measured
/// tiled (1.013, 0.974), untiled over the same pairs (0.957, 1.013), stitched (1.355, 1.146),
/// untiled at the stitched edges (0.910, 1.006). Each tile normalises with its own GroupNorm
/// statistics, so on these weights the tiled latents depart from the untiled ones by about their
/// own size (mean|Δ|/mean|untiled| 1.02): the passes are equal only with one tile (above).
#[test]
fn tiled_passes_leave_no_seams() {
    let model = tiny_sdxl();
    let native = DenoiseTiles::native(&model).unwrap();
    let stitched = DenoiseTiles { overlap: 0, ..native };
    let side = 48;
    let ratios = |latents: &Tensor, tiles: DenoiseTiles| {
        let edges = tile_edges(tiles, side);
        let h = seam_ratio(&column_gradients(latents), &edges);
        let v = seam_ratio(&column_gradients(&latents.transpose(2, 3).unwrap()), &edges);
        (h, v)
    };
    let (tiled, untiled, naive) =
        (denoised(&model, side, Some(native)), denoised(&model, side, None), denoised(&model, side, Some(stitched)));
    let (t, u, n, un) =
        (ratios(&tiled, native), ratios(&untiled, native), ratios(&naive, stitched), ratios(&untiled, stitched));
    let diff = (&tiled - &untiled).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = untiled.abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!(
        "seam ratio (edge-pair gradient / elsewhere, h v): tiled {t:.3?}, untiled same pairs {u:.3?}; stitched \
         {n:.3?}, untiled at its edges {un:.3?}; tiled vs untiled mean|Δ|/mean|untiled| {:.3}",
        diff / scale
    );
    assert!(t.0.max(t.1) <= 1.1, "seams: tiled {t:?} (untiled over the same pairs {u:?})");
    assert!(u.0.max(u.1) <= 1.1 && un.0.max(un.1) <= 1.1, "the untiled loop has no edges: {u:?} {un:?}");
    assert!(n.0.min(n.1) >= 1.12, "the measure should see stitched tiles' seams: {n:?}");
}
