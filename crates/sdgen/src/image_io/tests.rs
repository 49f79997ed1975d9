use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::*;

fn testdata() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata"))
}

fn as_image(t: &Tensor) -> RgbImage {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3);
    RgbImage::new(w, h, t.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap()
}

/// `tools/reference/make_resize.py`: PIL 13's `Image.resize(..., LANCZOS)` of three sources to 25
/// sizes, up and down, in both of PIL's pass orders. Must match byte for byte.
#[test]
fn lanczos_matches_pil_exactly() {
    let path = testdata().join("image_io/lanczos_pil.safetensors");
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut checked = 0;
    for (key, want) in &tensors {
        let Some(rest) = key.strip_prefix("out.") else { continue };
        let (name, size) = rest.split_once('.').unwrap();
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
        let src = as_image(&tensors[&format!("src.{name}")]);
        let got = resize_lanczos(&src, w, h).unwrap();
        let want = as_image(want);
        assert_eq!((got.width, got.height), (w, h), "{key}");
        let diffs = got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
        assert_eq!(diffs, 0, "{key}: {diffs} of {} bytes differ from PIL", want.data.len());
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} resizes checked");
}

#[test]
fn same_size_is_a_copy_and_zero_is_refused() {
    let img = RgbImage::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(resize_lanczos(&img, 2, 1).unwrap(), img);
    assert!(resize_lanczos(&img, 0, 1).is_err());
    assert!(RgbImage::new(2, 2, vec![0; 5]).is_err());
}

#[test]
fn decodes_the_reference_init_png() {
    let img = load_rgb(&testdata().join("reference/sd15/img2img_init_70x60.png")).unwrap();
    assert_eq!((img.width, img.height), (70, 60));
    assert_eq!(format!("{img:?}"), "RgbImage(70x60)");
}

#[test]
fn non_images_are_invalid_input_naming_the_file() {
    let err = decode_rgb(b"just some text, not pixels", "notes.png").unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("notes.png") && err.to_string().contains("not a PNG, JPEG or WebP"), "{err}");
    // A PNG signature with nothing valid after it.
    let err = decode_rgb(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRgarbage", "cut.png").unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)) && err.to_string().contains("cut.png"), "{err}");
    let err = load_rgb(Path::new("/no/such/init.png")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("/no/such/init.png"), "{err}");
}

/// Encodes one PNG with the png crate (8- or 16-bit, any colour type).
fn png_bytes(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(color);
    enc.set_depth(depth);
    enc.write_header().unwrap().write_image_data(data).unwrap();
    out
}

/// PIL's `convert("RGB")`: alpha dropped (not composited), grey replicated, 16-bit samples cut
/// to their high byte, 16-bit grey clipped at 255 (checked against PIL 13 on these very files).
#[test]
fn conversions_follow_pil() {
    use png::{BitDepth::*, ColorType::*};
    let rgba = png_bytes(1, 1, Rgba, Eight, &[10, 20, 30, 0]);
    assert_eq!(decode_rgb(&rgba, "a").unwrap().data, vec![10, 20, 30]);
    let la = png_bytes(2, 1, GrayscaleAlpha, Eight, &[7, 255, 9, 0]);
    assert_eq!(decode_rgb(&la, "a").unwrap().data, vec![7, 7, 7, 9, 9, 9]);
    let rgb16 = png_bytes(2, 1, Rgb, Sixteen, &[0x12, 0x34, 0xff, 0xff, 0x00, 0x80, 0x80, 0x7f, 1, 0, 0, 255]);
    assert_eq!(decode_rgb(&rgb16, "a").unwrap().data, vec![0x12, 0xff, 0x00, 0x80, 1, 0]);
    let g16 = png_bytes(3, 1, Grayscale, Sixteen, &[0, 200, 0, 255, 1, 0]);
    assert_eq!(decode_rgb(&g16, "a").unwrap().data, vec![200, 200, 200, 255, 255, 255, 255, 255, 255]);
}

/// A wider sweep than the committed fixture: `SDGEN_PIL_SWEEP=file.safetensors` made by
/// `tools/reference/make_resize.py --sweep file.safetensors` (hundreds of random sizes, not
/// committed). Run with `cargo test -p sdgen --lib image_io -- --ignored`.
#[test]
#[ignore]
fn lanczos_matches_pil_on_a_random_sweep() {
    let Some(path) = std::env::var_os("SDGEN_PIL_SWEEP") else {
        panic!("set SDGEN_PIL_SWEEP to a sweep file made by make_resize.py --sweep");
    };
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut checked = 0;
    for (key, want) in &tensors {
        let Some(id) = key.strip_prefix("out.") else { continue };
        let src = as_image(&tensors[&format!("src.{id}")]);
        let want = as_image(want);
        let got = resize_lanczos(&src, want.width, want.height).unwrap();
        assert!(got == want, "{key}: {}x{} -> {}x{} differs from PIL", src.width, src.height, want.width, want.height);
        checked += 1;
    }
    eprintln!("{checked} resizes equal to PIL's");
}

/// A request carrying an init image crosses a broker as JSON: the pixels as one base64 string,
/// read back exactly; a size that does not match the pixels is refused.
#[test]
fn rgb_images_serialize_as_base64_and_are_checked_when_read() {
    let image = RgbImage::new(2, 1, vec![0, 1, 2, 253, 254, 255]).unwrap();
    let json = serde_json::to_value(&image).unwrap();
    assert_eq!(json, serde_json::json!({"width": 2, "height": 1, "rgb_base64": "AAEC/f7/"}));
    assert_eq!(serde_json::from_value::<RgbImage>(json).unwrap(), image);
    let wrong = serde_json::json!({"width": 3, "height": 1, "rgb_base64": "AAEC/f7/"});
    let err = serde_json::from_value::<RgbImage>(wrong).unwrap_err().to_string();
    assert!(err.contains("needs 9 bytes, got 6"), "{err}");
}
