//! The SDXL refiner's run. The refiner only ever refines a picture (its `model_index.json` names
//! `StableDiffusionXLImg2ImgPipeline`), so its benchmark is an image-to-image run at diffusers'
//! default strength on a synthetic init image of the output size: the VAE encode, the last
//! `int(steps · strength)` denoising steps and the decode, the stages a refiner pass costs.

use sdgen::image_io::RgbImage;
use sdgen::pipeline::{skipped_steps, Img2ImgRequest, InitImage, Request};

/// `StableDiffusionXLImg2ImgPipeline.__call__`'s default `strength` (SD 1.5's image-to-image
/// default is 0.8; the refiner's is 0.3, it only retouches).
pub const REFINER_STRENGTH: f64 = 0.3;

/// A smooth colour field with some edges, `width × height`: content for the VAE encoder (its
/// cost does not depend on the pixels, but a flat image would hide NaN-free-ness problems less).
pub fn synthetic_init_image(width: usize, height: usize) -> anyhow::Result<InitImage> {
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let r = x * 255 / width.max(1);
            let g = y * 255 / height.max(1);
            let b = if (x / 64 + y / 64) % 2 == 0 { 200 } else { 40 };
            data.extend_from_slice(&[r as u8, g as u8, b]);
        }
    }
    Ok(InitImage { name: format!("synthetic {width}x{height}"), image: RgbImage::new(width, height, data)? })
}

/// The image-to-image request of a refiner run of `steps` steps.
pub fn refiner_request(request: Request, init_image: &InitImage, strength: f64) -> Img2ImgRequest {
    Img2ImgRequest { request, init_image: init_image.clone(), strength: Some(strength) }
}

/// The fewest steps (at least 2) that leave a step to run at `strength`: the warm-up run's.
pub fn warmup_steps(strength: f64) -> usize {
    (2..=1000).find(|&s| skipped_steps(s, strength).is_ok()).unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_runs_at_least_one_step() {
        // int(4 × 0.3) = 1 is the first with a step left; strength 1 runs from 2 steps on.
        assert_eq!(warmup_steps(0.3), 4);
        assert_eq!(warmup_steps(1.0), 2);
        assert_eq!(warmup_steps(0.8), 2);
    }

    #[test]
    fn init_image_has_the_size() {
        let img = synthetic_init_image(24, 16).unwrap();
        assert_eq!((img.image.width, img.image.height, img.image.data.len()), (24, 16, 24 * 16 * 3));
    }
}
