//! Training-time augmentation on HWC u8 images (after `resize::fit` brought them to the
//! model's size, with a random resized crop when `crop_scale` > 0), on the CPU before batching, from the
//! run's seeded RNG (so a seed fixes the augmentation on every backend). Each trick is
//! a parameter and 0 turns it off:
//! - random shift: pad by `shift` pixels with zeros and crop back at a random offset
//!   (the small-image form of random crop);
//! - horizontal flip with probability `flip`;
//! - RandAugment: `randaugment_n` operations at magnitude `randaugment_m` (0..=30;
//!   `randaugment`);
//! - random erasing with probability `erase`: a rectangle of 2%..33% of the area, aspect
//!   ratio 0.3..3.3, filled with uniform random bytes (Zhong et al.).

use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    pub shift: usize,
    pub flip: f64,
    pub erase: f64,
    /// RandAugment operations per image (0 = off); written before it existed: off.
    #[serde(default)]
    pub randaugment_n: usize,
    #[serde(default)]
    pub randaugment_m: usize,
    /// `RandomResizedCrop`'s smallest area fraction (0 = off: images at another size than
    /// the model's are centre-cropped and resized, see `resize`); written before it
    /// existed: off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub crop_scale: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl AugmentConfig {
    pub fn none() -> Self {
        AugmentConfig { shift: 0, flip: 0.0, erase: 0.0, randaugment_n: 0, randaugment_m: 0, crop_scale: 0.0 }
    }

    pub fn is_none(&self) -> bool {
        self.shift == 0 && self.flip <= 0.0 && self.erase <= 0.0 && self.randaugment_n == 0 && self.crop_scale <= 0.0
    }

    /// Augmented copy of one HWC image.
    pub fn apply(&self, img: &[u8], h: usize, w: usize, c: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut out = img.to_vec();
        if self.shift > 0 {
            let s = self.shift as i64;
            let dy = rng.random_range(-s..=s) as isize;
            let dx = rng.random_range(-s..=s) as isize;
            out = shift(&out, h, w, c, dy, dx);
        }
        if self.flip > 0.0 && rng.random_bool(self.flip.min(1.0)) {
            out = hflip(&out, h, w, c);
        }
        if self.randaugment_n > 0 {
            super::randaugment::apply(&mut out, h, w, c, self.randaugment_n, self.randaugment_m, rng);
        }
        if self.erase > 0.0 && rng.random_bool(self.erase.min(1.0)) {
            erase(&mut out, h, w, c, rng);
        }
        out
    }
}

/// Content moved by (dy, dx); uncovered pixels are 0.
pub fn shift(img: &[u8], h: usize, w: usize, c: usize, dy: isize, dx: isize) -> Vec<u8> {
    let mut out = vec![0u8; img.len()];
    for y in 0..h as isize {
        let sy = y - dy;
        if sy < 0 || sy >= h as isize {
            continue;
        }
        for x in 0..w as isize {
            let sx = x - dx;
            if sx < 0 || sx >= w as isize {
                continue;
            }
            let d = (y as usize * w + x as usize) * c;
            let s = (sy as usize * w + sx as usize) * c;
            out[d..d + c].copy_from_slice(&img[s..s + c]);
        }
    }
    out
}

/// Mirror image left to right.
pub fn hflip(img: &[u8], h: usize, w: usize, c: usize) -> Vec<u8> {
    let mut out = vec![0u8; img.len()];
    for y in 0..h {
        for x in 0..w {
            let d = (y * w + x) * c;
            let s = (y * w + (w - 1 - x)) * c;
            out[d..d + c].copy_from_slice(&img[s..s + c]);
        }
    }
    out
}

fn erase(img: &mut [u8], h: usize, w: usize, c: usize, rng: &mut ChaCha8Rng) {
    let area = (h * w) as f64;
    // A few tries to find a rectangle that fits, as in the paper.
    for _ in 0..10 {
        let target = area * rng.random_range(0.02..0.33);
        let ratio = (rng.random_range((0.3f64).ln()..(3.3f64).ln())).exp();
        let eh = (target * ratio).sqrt().round() as usize;
        let ew = (target / ratio).sqrt().round() as usize;
        if eh == 0 || ew == 0 || eh >= h || ew >= w {
            continue;
        }
        let y0 = rng.random_range(0..=h - eh);
        let x0 = rng.random_range(0..=w - ew);
        for y in y0..y0 + eh {
            for x in x0..x0 + ew {
                for ch in 0..c {
                    img[(y * w + x) * c + ch] = rng.random::<u8>();
                }
            }
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn flip_and_shift_move_pixels() {
        // 2x3 single channel: [1 2 3; 4 5 6]
        let img = [1u8, 2, 3, 4, 5, 6];
        assert_eq!(hflip(&img, 2, 3, 1), vec![3, 2, 1, 6, 5, 4]);
        assert_eq!(shift(&img, 2, 3, 1, 0, 1), vec![0, 1, 2, 0, 4, 5]);
        assert_eq!(shift(&img, 2, 3, 1, 1, 0), vec![0, 0, 0, 1, 2, 3]);
    }

    #[test]
    fn erase_changes_a_rectangle_and_none_is_identity() {
        let img = vec![7u8; 28 * 28];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let none = AugmentConfig::none();
        assert_eq!(none.apply(&img, 28, 28, 1, &mut rng), img);
        let always = AugmentConfig { shift: 0, flip: 0.0, erase: 1.0, randaugment_n: 0, randaugment_m: 0, crop_scale: 0.0 };
        let out = always.apply(&img, 28, 28, 1, &mut rng);
        let changed = out.iter().filter(|&&v| v != 7).count();
        assert!(changed > 0 && changed < 28 * 28 / 2, "{changed}");
    }
}
