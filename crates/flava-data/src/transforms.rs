//! FLAVA's training image transform: one random-resized-crop box (torchvision `RandomResizedCrop`
//! parameters, scale 0.9–1.0, ratio 3/4–4/3) applied to both branches: the encoder image (bicubic
//! to `image_size`, CLIP normalisation) and the codebook image (Lanczos to `codebook_size`,
//! `0.8·x + 0.1`), as torchmultimodal's `TwoWayRandomResizedCrop`. Horizontal flip is off by
//! default: captions say "left" and "right".

use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::processor::{CLIP_MEAN, CLIP_STD};
use crate::resample::{resize, Filter};

/// Parameters of the training transform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainTransformConfig {
    /// Encoder image side.
    pub image_size: u32,
    /// Codebook image side.
    pub codebook_size: u32,
    /// Range of the crop area as a share of the image.
    pub scale: (f64, f64),
    /// Range of the crop aspect ratio (width / height).
    pub ratio: (f64, f64),
    /// Flip horizontally with probability 0.5.
    pub hflip: bool,
}

impl Default for TrainTransformConfig {
    fn default() -> Self {
        Self {
            image_size: 224,
            codebook_size: 112,
            scale: (0.9, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: false,
        }
    }
}

/// A crop box: top, left, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// torchvision `RandomResizedCrop.get_params`: 10 attempts, then a central crop at the ratio bound.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> CropBox {
    let area = (width as f64) * (height as f64);
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, ((width as f64) / ratio.0).round() as u32)
    } else if in_ratio > ratio.1 {
        (((height as f64) * ratio.1).round() as u32, height)
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// The two branches of one image, CHW f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TwoWayImage {
    /// [3, image_size, image_size], CLIP-normalised.
    pub pixels: Vec<f32>,
    /// [3, codebook_size, codebook_size], in `0.8·x + 0.1` space.
    pub codebook: Vec<f32>,
}

/// CHW floats of an RGB image: `(v/255 − mean)/std`, or `0.8·v/255 + 0.1` for the codebook.
pub fn to_chw(img: &RgbImage, normalize: Option<([f32; 3], [f32; 3])>, map_pixels: bool) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            let mut v = (p.0[c] as f64 * (1.0 / 255.0)) as f32;
            if let Some((mean, std)) = normalize {
                v = (v - mean[c]) / std[c];
            }
            if map_pixels {
                v = 0.8 * v + 0.1;
            }
            out[c * plane + i] = v;
        }
    }
    out
}

/// Applies the training transform: one crop box for both branches.
pub fn train_transform(img: &RgbImage, cfg: &TrainTransformConfig, rng: &mut impl Rng) -> TwoWayImage {
    let b = random_resized_crop_box(img.width(), img.height(), cfg.scale, cfg.ratio, rng);
    let mut crop = image::imageops::crop_imm(img, b.left, b.top, b.width, b.height).to_image();
    if cfg.hflip && rng.random::<bool>() {
        image::imageops::flip_horizontal_in_place(&mut crop);
    }
    let enc = resize(&crop, cfg.image_size, cfg.image_size, Filter::Bicubic);
    let cb = resize(&crop, cfg.codebook_size, cfg.codebook_size, Filter::Lanczos);
    TwoWayImage {
        pixels: to_chw(&enc, Some((CLIP_MEAN, CLIP_STD)), false),
        codebook: to_chw(&cb, None, true),
    }
}

/// The evaluation transform (HF `FlavaImageProcessor` defaults at the given sizes): the whole
/// image squashed to `image_size` (bicubic) and to `codebook_size` (Lanczos).
pub fn eval_transform(img: &RgbImage, image_size: u32, codebook_size: u32) -> TwoWayImage {
    let enc = resize(img, image_size, image_size, Filter::Bicubic);
    let cb = resize(img, codebook_size, codebook_size, Filter::Lanczos);
    TwoWayImage {
        pixels: to_chw(&enc, Some((CLIP_MEAN, CLIP_STD)), false),
        codebook: to_chw(&cb, None, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn crop_boxes_respect_scale_ratio_and_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for (w, h) in [(256, 256), (300, 200), (97, 131), (1000, 50)] {
            for _ in 0..500 {
                let b = random_resized_crop_box(w, h, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
                assert!(b.left + b.width <= w && b.top + b.height <= h, "{b:?} in {w}x{h}");
                let share = (b.width * b.height) as f64 / (w * h) as f64;
                if w == 256 {
                    assert!(share > 0.88 && share <= 1.0, "{share}");
                }
            }
        }
    }

    #[test]
    fn both_branches_have_their_sizes_and_ranges() {
        let img = RgbImage::from_fn(120, 90, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, 128]));
        let t = train_transform(
            &img,
            &TrainTransformConfig {
                image_size: 64,
                codebook_size: 32,
                ..Default::default()
            },
            &mut ChaCha8Rng::seed_from_u64(1),
        );
        assert_eq!((t.pixels.len(), t.codebook.len()), (3 * 64 * 64, 3 * 32 * 32));
        assert!(t.codebook.iter().all(|&v| (0.1..=0.9).contains(&v)));
    }
}
