//! RandAugment (Cubuk et al., 2020) on HWC u8 images, as torchvision implements it
//! with 31 magnitude bins: `n` operations drawn uniformly (with replacement) from the
//! 14 below, each at magnitude `m` (0..=30; the seed used 2 ops at 9), signed ops
//! flipped with probability 1/2. Geometric ops map output pixels back through the
//! inverse transform about the image centre, nearest neighbour, zero fill (the
//! drawings' background). Colour ops act per channel; on one channel `Color`
//! (saturation) is the identity.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// The operations, in torchvision's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

pub const OPS: [Op; 14] = [
    Op::Identity,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
    Op::Brightness,
    Op::Color,
    Op::Contrast,
    Op::Sharpness,
    Op::Posterize,
    Op::Solarize,
    Op::AutoContrast,
    Op::Equalize,
];

/// Largest magnitude bin (torchvision's `num_magnitude_bins` = 31).
pub const MAX_MAGNITUDE: usize = 30;

/// `n` random operations at magnitude `m` on one HWC image, in place.
pub fn apply(img: &mut Vec<u8>, h: usize, w: usize, c: usize, n: usize, m: usize, rng: &mut ChaCha8Rng) {
    for _ in 0..n {
        let op = OPS[rng.random_range(0..OPS.len())];
        let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
        apply_op(img, h, w, c, op, m.min(MAX_MAGNITUDE), sign);
    }
}

/// One operation at magnitude bin `m` with the given sign (ignored by unsigned ops).
pub fn apply_op(img: &mut Vec<u8>, h: usize, w: usize, c: usize, op: Op, m: usize, sign: f64) {
    let t = m as f64 / MAX_MAGNITUDE as f64; // 0..=1 along torchvision's linspace
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    match op {
        Op::Identity => {}
        // Inverse maps: output (y, x) reads input (sy, sx).
        Op::ShearX => {
            let s = sign * 0.3 * t;
            *img = warp(img, h, w, c, |y, x| (y, x + s * (y - cy)));
        }
        Op::ShearY => {
            let s = sign * 0.3 * t;
            *img = warp(img, h, w, c, |y, x| (y + s * (x - cx), x));
        }
        Op::TranslateX => {
            let d = sign * 150.0 / 331.0 * w as f64 * t;
            *img = warp(img, h, w, c, |y, x| (y, x - d));
        }
        Op::TranslateY => {
            let d = sign * 150.0 / 331.0 * h as f64 * t;
            *img = warp(img, h, w, c, |y, x| (y - d, x));
        }
        Op::Rotate => {
            let a = (sign * 30.0 * t).to_radians();
            let (sin, cos) = a.sin_cos();
            *img = warp(img, h, w, c, |y, x| {
                let (dy, dx) = (y - cy, x - cx);
                (cy + cos * dy - sin * dx, cx + sin * dy + cos * dx)
            });
        }
        Op::Brightness => blend_with(img, |_| 0.0, 1.0 + sign * 0.9 * t),
        Op::Color => {
            if c >= 3 {
                let gray = grayscale(img, c);
                let factor = 1.0 + sign * 0.9 * t;
                for (i, v) in img.iter_mut().enumerate() {
                    *v = clamp(gray[i / c] + factor * (*v as f64 - gray[i / c]));
                }
            }
        }
        Op::Contrast => {
            let gray = grayscale(img, c);
            let mean = gray.iter().sum::<f64>() / gray.len().max(1) as f64;
            blend_with(img, |_| mean, 1.0 + sign * 0.9 * t);
        }
        Op::Sharpness => {
            let smooth = smoothed(img, h, w, c);
            blend_with(img, |i| smooth[i], 1.0 + sign * 0.9 * t);
        }
        Op::Posterize => {
            let bits = 8 - ((m as f64) / (MAX_MAGNITUDE as f64 / 4.0)).round() as u32;
            let mask = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
            img.iter_mut().for_each(|v| *v &= mask);
        }
        Op::Solarize => {
            let threshold = 255.0 * (1.0 - t);
            img.iter_mut().filter(|v| **v as f64 >= threshold).for_each(|v| *v = 255 - *v);
        }
        Op::AutoContrast => {
            for ch in 0..c {
                let values = img.iter().skip(ch).step_by(c);
                let (lo, hi) = values.fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                if hi > lo {
                    let scale = 255.0 / (hi - lo) as f64;
                    // Truncated like PIL's lookup table (the epsilon absorbs 255/(hi-lo) rounding).
                    img.iter_mut().skip(ch).step_by(c).for_each(|v| *v = ((*v - lo) as f64 * scale + 1e-9).floor().min(255.0) as u8);
                }
            }
        }
        Op::Equalize => {
            for ch in 0..c {
                let mut hist = [0usize; 256];
                img.iter().skip(ch).step_by(c).for_each(|&v| hist[v as usize] += 1);
                let total: usize = hist.iter().sum();
                // PIL's equalize: the step leaves out the last non-empty bin.
                let last = hist.iter().rposition(|&n| n > 0).map(|i| hist[i]).unwrap_or(0);
                let step = (total - last) / 255;
                if step == 0 {
                    continue;
                }
                let mut lut = [0u8; 256];
                let mut acc = step / 2;
                for (i, n) in hist.iter().enumerate() {
                    lut[i] = (acc / step).min(255) as u8;
                    acc += n;
                }
                img.iter_mut().skip(ch).step_by(c).for_each(|v| *v = lut[*v as usize]);
            }
        }
    }
}

fn clamp(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// out = base + factor * (img - base), per byte (PIL's ImageEnhance).
fn blend_with(img: &mut [u8], base: impl Fn(usize) -> f64, factor: f64) {
    for (i, v) in img.iter_mut().enumerate() {
        let b = base(i);
        *v = clamp(b + factor * (*v as f64 - b));
    }
}

/// Luma per pixel (ITU-R 601-2, as PIL's "L"); the value itself on one channel.
fn grayscale(img: &[u8], c: usize) -> Vec<f64> {
    img.chunks(c)
        .map(|p| if c >= 3 { 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64 } else { p[0] as f64 })
        .collect()
}

/// PIL's SMOOTH filter (3x3, centre weight 5, total 13), borders left as they are.
fn smoothed(img: &[u8], h: usize, w: usize, c: usize) -> Vec<f64> {
    let mut out: Vec<f64> = img.iter().map(|&v| v as f64).collect();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            for ch in 0..c {
                let mut sum = 0.0;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let weight = if dy == 1 && dx == 1 { 5.0 } else { 1.0 };
                        sum += weight * img[((y + dy - 1) * w + (x + dx - 1)) * c + ch] as f64;
                    }
                }
                out[(y * w + x) * c + ch] = sum / 13.0;
            }
        }
    }
    out
}

/// Resample through an inverse map (output y, x) -> input (y, x); nearest, zero fill.
fn warp(img: &[u8], h: usize, w: usize, c: usize, inverse: impl Fn(f64, f64) -> (f64, f64)) -> Vec<u8> {
    let mut out = vec![0u8; img.len()];
    for y in 0..h {
        for x in 0..w {
            let (sy, sx) = inverse(y as f64, x as f64);
            let (sy, sx) = (sy.round(), sx.round());
            if sy < 0.0 || sx < 0.0 || sy >= h as f64 || sx >= w as f64 {
                continue;
            }
            let (s, d) = ((sy as usize * w + sx as usize) * c, (y * w + x) * c);
            out[d..d + c].copy_from_slice(&img[s..s + c]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp() -> Vec<u8> {
        (0..16).map(|v| (v * 16) as u8).collect() // 4x4, one channel
    }

    #[test]
    fn geometric_ops_move_pixels_the_expected_way() {
        // TranslateX at full magnitude on 4 wide: 150/331*4 = 1.81 -> 2 pixels right.
        let mut img = ramp();
        apply_op(&mut img, 4, 4, 1, Op::TranslateX, MAX_MAGNITUDE, 1.0);
        assert_eq!(&img[..4], &[0, 0, 0, 16]);
        // Rotating by 0 degrees (magnitude 0) is the identity; magnitude 30 moves pixels.
        let mut same = ramp();
        apply_op(&mut same, 4, 4, 1, Op::Rotate, 0, 1.0);
        assert_eq!(same, ramp());
        let mut turned = ramp();
        apply_op(&mut turned, 4, 4, 1, Op::Rotate, MAX_MAGNITUDE, 1.0);
        assert_ne!(turned, ramp());
    }

    #[test]
    fn colour_ops_follow_pil() {
        let mut img = vec![0u8, 100, 200, 255];
        apply_op(&mut img, 2, 2, 1, Op::Solarize, 15, 1.0); // threshold 127.5
        assert_eq!(img, vec![0, 100, 55, 0]);
        let mut img = vec![0u8, 100, 200, 255];
        apply_op(&mut img, 2, 2, 1, Op::Posterize, 30, 1.0); // 4 bits
        assert_eq!(img, vec![0, 96, 192, 240]);
        let mut img = vec![50u8, 100, 150, 100];
        apply_op(&mut img, 2, 2, 1, Op::AutoContrast, 0, 1.0);
        assert_eq!(img, vec![0, 127, 255, 127]);
        let mut img = vec![100u8, 200];
        apply_op(&mut img, 1, 2, 1, Op::Brightness, 10, -1.0); // factor 0.7
        assert_eq!(img, vec![70, 140]);
    }

    #[test]
    fn magnitude_zero_keeps_the_image_for_every_op_but_the_data_driven_ones() {
        for op in OPS {
            if matches!(op, Op::AutoContrast | Op::Equalize | Op::Solarize) {
                continue; // these do not depend on magnitude (Solarize at 0 inverts only 255)
            }
            let mut img = ramp();
            apply_op(&mut img, 4, 4, 1, op, 0, 1.0);
            assert_eq!(img, ramp(), "{op:?}");
        }
    }

    #[test]
    fn same_seed_same_result() {
        let run = || {
            let mut img: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            apply(&mut img, 28, 28, 1, 2, 9, &mut rng);
            img
        };
        assert_eq!(run(), run());
    }
}
