//! Which Lanczos-3 is closest to PIL's `Image.resize(..., Image.LANCZOS)` on the tiny models'
//! images (testdata/image_io/upscale_pil.safetensors, tools/reference/make_resize.py), and how
//! fast each is at the real size (1024² → 2048²): fast_image_resize 6, image 0.25's
//! `imageops::resize(.., Lanczos3)`, and sdgen's own port of PIL (crates/sdgen/src/image_io.rs).
//!
//!   CARGO_TARGET_DIR=../../target/resize-compare cargo run --manifest-path tools/resize-compare/Cargo.toml

use std::collections::BTreeMap;
use std::time::Instant;

use fast_image_resize as fr;

/// What sdgen's `image_io.rs` needs of its crate, so the port compiles here unchanged.
mod shim {
    #[derive(Debug)]
    pub enum Error {
        InvalidInput(String),
    }
    impl Error {
        pub fn io(_: &std::path::Path, e: std::io::Error) -> Self {
            Error::InvalidInput(e.to_string())
        }
    }
    pub type Result<T> = std::result::Result<T, Error>;
}
use shim::{Error, Result};

#[path = "../../../crates/sdgen/src/image_io.rs"]
#[allow(dead_code)]
mod image_io;

struct Img {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

/// The u8 `[h, w, 3]` tensors of a safetensors file.
fn load(path: &str) -> BTreeMap<String, Img> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out = BTreeMap::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap() as usize).collect();
        let off: Vec<usize> = v["data_offsets"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap() as usize).collect();
        let data = bytes[8 + n + off[0]..8 + n + off[1]].to_vec();
        out.insert(k.clone(), Img { w: shape[1], h: shape[0], data });
    }
    out
}

fn fir(src: &Img, w: usize, h: usize) -> Vec<u8> {
    let s = fr::images::ImageRef::new(src.w as u32, src.h as u32, &src.data, fr::PixelType::U8x3).unwrap();
    let mut d = fr::images::Image::new(w as u32, h as u32, fr::PixelType::U8x3);
    let opts = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
    fr::Resizer::new().resize(&s, &mut d, &opts).unwrap();
    d.into_vec()
}

fn image_crate(src: &Img, w: usize, h: usize) -> Vec<u8> {
    let s = image::RgbImage::from_raw(src.w as u32, src.h as u32, src.data.clone()).unwrap();
    image::imageops::resize(&s, w as u32, h as u32, image::imageops::FilterType::Lanczos3).into_raw()
}

fn port(src: &Img, w: usize, h: usize) -> Vec<u8> {
    let s = image_io::RgbImage::new(src.w, src.h, src.data.clone()).unwrap();
    image_io::resize_lanczos(&s, w, h).unwrap().data
}

type Resize = fn(&Img, usize, usize) -> Vec<u8>;
const WAYS: [(&str, Resize); 3] = [("fast_image_resize 6.1", fir), ("image 0.25 Lanczos3", image_crate), ("sdgen port", port)];

fn main() {
    let t = load(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/image_io/upscale_pil.safetensors"));
    println!("| resize | case | exact | ≤ 1/255 | max diff |");
    println!("|---|---|---|---|---|");
    for (name, f) in WAYS {
        let (mut all, mut exact, mut within, mut worst) = (0usize, 0usize, 0usize, 0u8);
        for (key, want) in t.iter().filter(|(k, _)| k.starts_with("out.")) {
            let src = &t[&format!("src.{}", key.split('.').nth(1).unwrap())];
            let got = f(src, want.w, want.h);
            let d: Vec<u8> = got.iter().zip(&want.data).map(|(a, b)| a.abs_diff(*b)).collect();
            let (e, w1, m) = (d.iter().filter(|&&x| x == 0).count(), d.iter().filter(|&&x| x <= 1).count(), *d.iter().max().unwrap());
            println!("| {name} | {} | {:.3}% | {:.3}% | {m} |", &key[4..], 100.0 * e as f64 / d.len() as f64, 100.0 * w1 as f64 / d.len() as f64);
            (all, exact, within, worst) = (all + d.len(), exact + e, within + w1, worst.max(m));
        }
        println!("| **{name}** | all | {:.3}% | {:.3}% | {worst} |", 100.0 * exact as f64 / all as f64, 100.0 * within as f64 / all as f64);
    }
    // Speed at the real size: a 1024² image with structure (gradients, edges) to 2048², best of 5.
    let (w, h) = (1024, 1024);
    let data = (0..w * h * 3).map(|i| ((i * 7 + (i / 3071) * 13) % 251) as u8).collect();
    let big = Img { w, h, data };
    for (name, f) in WAYS {
        let best = (0..5).map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(f(&big, 2 * w, 2 * h));
            t0.elapsed().as_secs_f64() * 1000.0
        }).fold(f64::MAX, f64::min);
        println!("{name}: 1024² → 2048² in {best:.1} ms (best of 5, one thread)");
    }
}
