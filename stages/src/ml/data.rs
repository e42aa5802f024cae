//! In-memory image data as the models see it: a borrowed view of NHWC u8 pixels (the
//! layout of `artifact::ImageSet`) and the conversion of a batch into an NCHW float
//! tensor. Pixels map to [-1, 1] by x/127.5 - 1; the mapping is fixed (not learned from
//! data) so a model needs no extra statistics to predict.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// A borrowed set of images, NHWC u8.
#[derive(Debug, Clone, Copy)]
pub struct Images<'a> {
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub pixels: &'a [u8],
}

impl<'a> Images<'a> {
    /// Checks that the pixel buffer matches the declared shape.
    pub fn new(n: usize, height: usize, width: usize, channels: usize, pixels: &'a [u8]) -> Result<Self, String> {
        let want = n.checked_mul(height).and_then(|v| v.checked_mul(width)).and_then(|v| v.checked_mul(channels));
        if want != Some(pixels.len()) {
            return Err(format!("{n} images of {height}x{width}x{channels} need {want:?} bytes, found {}", pixels.len()));
        }
        if height == 0 || width == 0 || channels == 0 {
            return Err(format!("images have an empty dimension: {height}x{width}x{channels}"));
        }
        Ok(Images { n, height, width, channels, pixels })
    }

    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The HWC bytes of image `i`.
    pub fn image(&self, i: usize) -> &'a [u8] {
        let len = self.image_len();
        &self.pixels[i * len..(i + 1) * len]
    }
}

/// One HWC image of `plane` pixels into `out` (its `channels * plane` CHW floats),
/// normalised to [-1, 1].
pub fn hwc_to_chw(img: &[u8], plane: usize, channels: usize, out: &mut [f32]) {
    for p in 0..plane {
        for ch in 0..channels {
            out[ch * plane + p] = img[p * channels + ch] as f32 / 127.5 - 1.0;
        }
    }
}

/// Normalised NCHW floats of HWC images given one after another.
pub fn to_nchw(images: &[&[u8]], height: usize, width: usize, channels: usize) -> Vec<f32> {
    let plane = height * width;
    let mut out = vec![0f32; images.len() * channels * plane];
    for (b, img) in images.iter().enumerate() {
        hwc_to_chw(img, plane, channels, &mut out[b * channels * plane..(b + 1) * channels * plane]);
    }
    out
}

/// A batch tensor [B, C, H, W] from HWC images.
pub fn batch_tensor<B: Backend>(images: &[&[u8]], height: usize, width: usize, channels: usize, device: &B::Device) -> Tensor<B, 4> {
    let data = to_nchw(images, height, width, channels);
    Tensor::from_data(TensorData::new(data, [images.len(), channels, height, width]), device)
}

/// How small gray drawings reach a network made for RGB photos: [N, 1 or 3, H, W] ->
/// [N, 3, resolution, resolution], a gray channel replicated, resized bilinearly (half-
/// pixel centres, as torchvision's `Resize` without antialiasing) when the size differs.
pub fn rgb_at<B: Backend>(x: Tensor<B, 4>, resolution: usize) -> Tensor<B, 4> {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    let [_, c, h, w] = x.dims();
    let x = if c == 1 { x.repeat_dim(1, 3) } else { x };
    if (h, w) == (resolution, resolution) {
        return x;
    }
    interpolate(x, [resolution, resolution], InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false))
}
