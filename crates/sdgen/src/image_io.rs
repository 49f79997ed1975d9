//! Image input: decoding init images (PNG, JPEG, WebP) to 8-bit RGB as diffusers' `load_image`
//! does, and PIL's `Image.resize(..., LANCZOS)` ported bit for bit.
//!
//! diffusers' image-to-image pipelines take a PIL image: `load_image` opens the file, applies its
//! EXIF orientation (`ImageOps.exif_transpose`) and converts it to RGB, and `VaeImageProcessor`
//! resizes it with Lanczos to a multiple of the VAE's factor. The resize is PIL's
//! `ImagingResample` (`src/libImaging/Resample.c`): separable, the filter support widened by the
//! scale when shrinking, per-pixel coefficients normalised to sum 1 and then quantised to 22-bit
//! fixed point, each pass rounding and clipping to 8 bits. Every one of those details shows in
//! the output bytes, so they are all reproduced here, including the order of the two passes.

use std::f64::consts::PI;
use std::fmt;
use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, `width × height × 3` bytes. Serialized (inside a
/// request a broker carries) as its size and its pixels in one base64 string — a JSON array of
/// numbers would be four times the size — and checked by [`RgbImage::new`] when read back.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "SerializedRgb", into = "SerializedRgb")]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The pixels, `[r, g, b]` per pixel, row-major.
    pub data: Vec<u8>,
}

/// [`RgbImage`] as serde formats write it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SerializedRgb {
    width: usize,
    height: usize,
    rgb_base64: String,
}

impl From<RgbImage> for SerializedRgb {
    fn from(image: RgbImage) -> Self {
        use base64::Engine as _;
        let rgb_base64 = base64::engine::general_purpose::STANDARD.encode(&image.data);
        Self { width: image.width, height: image.height, rgb_base64 }
    }
}

impl TryFrom<SerializedRgb> for RgbImage {
    type Error = Error;

    fn try_from(s: SerializedRgb) -> Result<Self> {
        use base64::Engine as _;
        let data = (base64::engine::general_purpose::STANDARD.decode(&s.rgb_base64))
            .map_err(|e| Error::InvalidInput(format!("an RGB image's pixels are not base64: {e}")))?;
        RgbImage::new(s.width, s.height, data)
    }
}

impl fmt::Debug for RgbImage {
    /// The size only: the pixels would flood any log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// Wraps `width × height × 3` bytes. Errors if the length does not match the size.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            return Err(Error::InvalidInput(format!(
                "an RGB image of {width}x{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Self { width, height, data })
    }
}

/// Reads and decodes an image file (PNG, JPEG or WebP, recognised by its content, not its name).
/// Errors: `Io` naming the path if it cannot be read, `InvalidInput` naming it if it is not an
/// image of those formats or is damaged.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, &path.display().to_string())
}

/// Decodes an encoded image as diffusers' `load_image` would see it: EXIF orientation applied,
/// converted to RGB the way PIL's `convert("RGB")` does (alpha dropped, not composited; grey
/// replicated; 16-bit samples cut to their high byte, as PIL reads 16-bit PNGs). `name` is the
/// image's name in error messages.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let not_an_image = |why: String| Error::InvalidInput(format!("init image {name}: {why}"));
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| not_an_image(format!("cannot be read ({e})")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(other) => return Err(not_an_image(format!("{other:?} images are not supported (use PNG, JPEG or WebP)"))),
        None => return Err(not_an_image("not a PNG, JPEG or WebP image".into())),
    }
    let mut decoder = reader.into_decoder().map_err(|e| not_an_image(format!("not a valid image ({e})")))?;
    // A missing or unreadable EXIF block means "as stored", as PIL's exif_transpose treats it.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| not_an_image(format!("damaged or unsupported image data ({e})")))?;
    img.apply_orientation(orientation);
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        return Err(not_an_image("the image is empty (0 pixels)".into()));
    }
    RgbImage::new(width, height, pil_rgb_bytes(img))
}

/// `Image.convert("RGB")` of what PIL would have opened.
fn pil_rgb_bytes(img: DynamicImage) -> Vec<u8> {
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(b) => b.pixels().flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLumaA8(b) => b.pixels().flat_map(|p| [p[0]; 3]).collect(),
        // PIL unpacks 16-bit RGB(A) and grey+alpha PNGs ("RGB;16B", "LA;16B") keeping the high byte.
        DynamicImage::ImageRgb16(b) => b.pixels().flat_map(|p| [hi(p[0]), hi(p[1]), hi(p[2])]).collect(),
        DynamicImage::ImageRgba16(b) => b.pixels().flat_map(|p| [hi(p[0]), hi(p[1]), hi(p[2])]).collect(),
        DynamicImage::ImageLumaA16(b) => b.pixels().flat_map(|p| [hi(p[0]); 3]).collect(),
        // 16-bit grey opens as mode "I;16", whose conversion to RGB clips at 255 instead of
        // scaling: kept, so the same file gives the same picture as in diffusers.
        DynamicImage::ImageLuma16(b) => b.pixels().flat_map(|p| [p[0].min(255) as u8; 3]).collect(),
        // Not produced by the PNG, JPEG and WebP decoders.
        other => other.to_rgb8().into_raw(),
    }
}

/// PIL's fixed-point precision for 8-bit resampling: 32 bits less 8 for the value and 2 for the
/// overshoot of negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Lanczos-3's support in input pixels (before widening for downscaling).
const LANCZOS_SUPPORT: f64 = 3.0;

/// `sin(πx) / (πx)`, as PIL computes it.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * PI;
    x.sin() / x
}

/// PIL's `lanczos_filter`: a sinc windowed by a 3× wider sinc, zero outside [-3, 3).
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// One pass's filter: for each output pixel, the first input pixel it reads, how many it reads,
/// and their fixed-point weights (`ksize` slots per output pixel).
struct Coefficients {
    ksize: usize,
    /// `(first, count)` per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the whole input range
/// (`box` = (0, in_size)).
fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    // PIL keeps the box in f32; whole sizes are exact in it.
    let (in0, in1) = (0f32, in_size as f32);
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero; negative starts are clamped to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let count = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(count) {
            let w = lanczos(((x as i64 + xmin) as f64 - center + 0.5) * inv_filterscale);
            *slot = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (x, out) in row.iter_mut().enumerate().take(count) {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            // Rounded half away from zero, then truncated, as PIL's (int)(±0.5 + w·2^22).
            *out = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin as usize, count));
    }
    Coefficients { ksize, bounds, weights }
}

/// PIL's `clip8`: the fixed-point sum shifted back to 8 bits and clamped.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The horizontal pass over input rows `first_row..first_row + rows`.
fn resample_horizontal(src: &RgbImage, first_row: usize, rows: usize, c: &Coefficients) -> RgbImage {
    let out_w = c.bounds.len();
    let mut data = vec![0u8; out_w * rows * 3];
    for yy in 0..rows {
        let line = &src.data[(yy + first_row) * src.width * 3..(yy + first_row + 1) * src.width * 3];
        for (xx, &(xmin, count)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + count];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &w) in k.iter().enumerate() {
                let px = &line[(x + xmin) * 3..(x + xmin) * 3 + 3];
                for ch in 0..3 {
                    ss[ch] += px[ch] as i32 * w;
                }
            }
            let out = &mut data[(yy * out_w + xx) * 3..(yy * out_w + xx) * 3 + 3];
            for ch in 0..3 {
                out[ch] = clip8(ss[ch]);
            }
        }
    }
    RgbImage { width: out_w, height: rows, data }
}

/// The vertical pass; `bounds` index rows of `src`.
fn resample_vertical(src: &RgbImage, c: &Coefficients) -> RgbImage {
    let out_h = c.bounds.len();
    let row_len = src.width * 3;
    let mut data = vec![0u8; row_len * out_h];
    for (yy, &(ymin, count)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + count];
        let out = &mut data[yy * row_len..(yy + 1) * row_len];
        for (i, o) in out.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &w) in k.iter().enumerate() {
                ss += src.data[(y + ymin) * row_len + i] as i32 * w;
            }
            *o = clip8(ss);
        }
    }
    RgbImage { width: src.width, height: out_h, data }
}

/// `image.resize((width, height), Image.LANCZOS)` for an RGB image, byte for byte as PIL
/// (`ImagingResampleInner`). Errors if either output side is 0.
pub fn resize_lanczos(src: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    if width == 0 || height == 0 {
        return Err(Error::InvalidInput(format!(
            "cannot resize a {}x{} image to {width}x{height}",
            src.width, src.height
        )));
    }
    let need_horizontal = width != src.width;
    let need_vertical = height != src.height;
    if !need_horizontal && !need_vertical {
        return Ok(src.clone());
    }
    // PIL shrinks height first when it shrinks more than twice as much as the width (to make the
    // horizontal pass cheaper); the order changes the rounding between passes, so it is kept.
    let (in_w, in_h) = (src.width as i64, src.height as i64);
    let dh = in_h - height as i64;
    let horizontal_first = !(dh > 0 && dh > (in_w - width as i64) * 2);
    let mut vertical = coefficients(src.height, height);
    if horizontal_first {
        let mut image = src.clone();
        if need_horizontal {
            // Only the input rows the vertical pass will read.
            let first = vertical.bounds[0].0;
            let (last_min, last_count) = vertical.bounds[height - 1];
            let last = last_min + last_count;
            for b in &mut vertical.bounds {
                b.0 -= first;
            }
            image = resample_horizontal(src, first, last - first, &coefficients(src.width, width));
        }
        if need_vertical {
            image = resample_vertical(&image, &vertical);
        }
        Ok(image)
    } else {
        let mut image = resample_vertical(src, &vertical);
        if need_horizontal {
            image = resample_horizontal(&image, 0, height, &coefficients(src.width, width));
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests;
