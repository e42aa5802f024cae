//! Bringing an image of any size and channel count to a model's input size: channel
//! conversion (gray replicated to RGB; RGB to gray with ITU-R 601 luma, as PIL's
//! `convert("L")`), then either the centre crop of the target's aspect ratio (prediction,
//! and training without `aug_crop_scale`) or torchvision's `RandomResizedCrop` (area
//! scale in [min, 1], aspect ratio in [3/4, 4/3], log-uniform, ten tries then the centre
//! crop), resampled with the `image` crate's triangle (bilinear) filter. An image already
//! at the target size and channels is passed through untouched, so the generated
//! benchmark's raw drawings reach the model exactly as stored.

use std::borrow::Cow;

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::store::Image;
pub use crate::store::Target;

fn convert_channels(img: Image<'_>, channels: usize) -> Image<'_> {
    if img.channels == channels {
        return img;
    }
    let pixels: Vec<u8> = match (img.channels, channels) {
        (1, 3) => img.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        (3, 1) => img.pixels.chunks_exact(3).map(|p| ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8).collect(),
        _ => img.pixels.into_owned(),
    };
    Image { height: img.height, width: img.width, channels, pixels: Cow::Owned(pixels) }
}

/// The crop (top, left, height, width) of `img` to resample.
type Crop = (usize, usize, usize, usize);

fn centre_crop(h: usize, w: usize, target: Target) -> Crop {
    // The largest centred region with the target's aspect ratio.
    let (th, tw) = (target.height as f64, target.width as f64);
    let (ch, cw) = if (w as f64) * th > (h as f64) * tw { (h, ((h as f64) * tw / th).round().max(1.0) as usize) } else { (((w as f64) * th / tw).round().max(1.0) as usize, w) };
    let (ch, cw) = (ch.min(h), cw.min(w));
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

fn random_crop(h: usize, w: usize, min_scale: f64, rng: &mut ChaCha8Rng, target: Target) -> Crop {
    let area = (h * w) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let a = area * rng.random_range(min_scale..=1.0);
        let ratio = rng.random_range(lo..=hi).exp();
        let cw = (a * ratio).sqrt().round() as usize;
        let ch = (a / ratio).sqrt().round() as usize;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            let top = rng.random_range(0..=h - ch);
            let left = rng.random_range(0..=w - cw);
            return (top, left, ch, cw);
        }
    }
    centre_crop(h, w, target)
}

fn resample(img: &Image<'_>, crop: Crop, target: Target) -> Result<Vec<u8>, String> {
    let (top, left, ch, cw) = crop;
    let (th, tw) = (target.height as u32, target.width as u32);
    let (x, y, cw, ch) = (left as u32, top as u32, cw as u32, ch as u32);
    let bad = || format!("{}x{}x{} pixels do not make an image", img.height, img.width, img.channels);
    Ok(match img.channels {
        1 => {
            let buf = GrayImage::from_raw(img.width as u32, img.height as u32, img.pixels.to_vec()).ok_or_else(bad)?;
            imageops::resize(&*imageops::crop_imm(&buf, x, y, cw, ch), tw, th, FilterType::Triangle).into_raw()
        }
        _ => {
            let buf = RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels.to_vec()).ok_or_else(bad)?;
            imageops::resize(&*imageops::crop_imm(&buf, x, y, cw, ch), tw, th, FilterType::Triangle).into_raw()
        }
    })
}

/// `img` at the target's size and channels: the centre crop, or with `random` (a minimum
/// area scale and the image's own stream) a random resized crop.
pub fn fit<'a>(img: Image<'a>, target: Target, random: Option<(f64, &mut ChaCha8Rng)>) -> Result<Cow<'a, [u8]>, String> {
    let img = convert_channels(img, target.channels);
    let (h, w) = (img.height, img.width);
    if h == 0 || w == 0 {
        return Err("an empty image".into());
    }
    let crop = match random {
        Some((min_scale, rng)) => random_crop(h, w, min_scale, rng, target),
        None if (h, w) == (target.height, target.width) => return Ok(img.pixels),
        None => centre_crop(h, w, target),
    };
    Ok(Cow::Owned(resample(&img, crop, target)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn img(h: usize, w: usize, c: usize) -> Image<'static> {
        Image { height: h, width: w, channels: c, pixels: Cow::Owned((0..h * w * c).map(|v| (v * 7 % 256) as u8).collect()) }
    }

    #[test]
    fn an_image_at_the_target_passes_through_and_others_are_fitted() {
        let t = Target { height: 4, width: 4, channels: 1 };
        let a = img(4, 4, 1);
        assert_eq!(fit(a.clone(), t, None).unwrap().as_ref(), a.pixels.as_ref());
        assert_eq!(fit(img(10, 30, 3), t, None).unwrap().len(), 16);
        let rgb = fit(img(4, 4, 1), Target { channels: 3, ..t }, None).unwrap();
        assert_eq!(&rgb[..3], &[a.pixels[0]; 3]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(fit(img(9, 13, 3), Target { height: 5, width: 6, channels: 3 }, Some((0.08, &mut rng))).unwrap().len(), 90);
        }
        assert_eq!(centre_crop(10, 30, t), (0, 10, 10, 10));
        assert!(fit(img(0, 3, 1), t, None).is_err());
    }
}
