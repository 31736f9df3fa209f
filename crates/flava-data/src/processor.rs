//! The image processor: HF `FlavaImageProcessor` reproduced, reading `preprocessor_config.json`.
//!
//! Encoder branch: RGB → resize (Pillow-exact bicubic, 224×224 squash by default) → center crop →
//! rescale ×1/255 → normalise with the CLIP mean/std → CHW f32. Codebook branch: resize (Lanczos,
//! 112×112) → center crop → rescale → normalise (mean 0, std 1) → `map_pixels` (0.8·x + 0.1).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::resample::{resize, Filter};

/// OpenAI CLIP mean, FLAVA's normalisation.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP std.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Why image bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("{0}")]
    Read(String),
    /// Not an image format the `image` crate knows.
    #[error("{0}")]
    Format(String),
    /// The header is unreadable.
    #[error("cannot read the image header: {0}")]
    Header(String),
    /// The declared size is over `limits.max_image_pixels` (checked before decoding).
    #[error("the image declares {width}x{height} = {pixels} pixels, over the limit of {max} (limits.max_image_pixels; a decompression bomb?)")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// `width × height`.
        pixels: u64,
        /// The limit.
        max: u64,
    },
    /// A declared width or height of zero.
    #[error("the image declares an empty size {width}x{height}")]
    Empty {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },
    /// A JPEG cut short (Pillow's "image file is truncated").
    #[error("JPEG data is truncated (no end-of-image marker)")]
    Truncated,
    /// The decoder failed on the pixel data.
    #[error("{0}")]
    Decode(String),
}

/// Errors of image loading and preprocessing.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The image could not be read or decoded.
    #[error("cannot read image {path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ImageError,
    },
    /// A size field of the configuration describes an impossible image.
    #[error("field `{field}`: {source}")]
    Size {
        /// The field (`size`, `crop_size`, ...).
        field: &'static str,
        /// What is wrong with it.
        source: ImageError,
    },
    /// The preprocessor configuration is unreadable or invalid.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why (names the field).
        message: String,
    },
}

/// A size as HF writes it: an int (square), `{height, width}` or `{shortest_edge}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    /// A square side.
    Square(u32),
    /// Exact height and width.
    HeightWidth {
        /// Height in pixels.
        height: u32,
        /// Width in pixels.
        width: u32,
    },
    /// Resize the shorter side, keeping the aspect ratio.
    ShortestEdge {
        /// Target of the shorter side.
        shortest_edge: u32,
    },
}

impl SizeSpec {
    /// Output `(width, height)` for an input of `(w, h)`, as HF's `get_resize_output_image_size`.
    pub fn output_size(self, w: u32, h: u32) -> (u32, u32) {
        match self {
            SizeSpec::Square(s) => (s, s),
            SizeSpec::HeightWidth { height, width } => (width, height),
            SizeSpec::ShortestEdge { shortest_edge: s } => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as u64 * long as u64 / short.max(1) as u64) as u32;
                if w <= h {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    /// `(width, height)` of a crop.
    pub fn crop_size(self) -> (u32, u32) {
        match self {
            SizeSpec::Square(s) | SizeSpec::ShortestEdge { shortest_edge: s } => (s, s),
            SizeSpec::HeightWidth { height, width } => (width, height),
        }
    }
}

/// The fields of an HF `preprocessor_config.json` that FLAVA's processor uses; defaults are HF's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    /// Resize the encoder image.
    pub do_resize: bool,
    /// Encoder resize target.
    pub size: SizeSpec,
    /// Pillow filter code (3 = BICUBIC).
    pub resample: u32,
    /// Center-crop the encoder image.
    pub do_center_crop: bool,
    /// Encoder crop size.
    pub crop_size: SizeSpec,
    /// Rescale the encoder image.
    pub do_rescale: bool,
    /// Rescale factor (1/255).
    pub rescale_factor: f32,
    /// Normalise the encoder image.
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel std.
    pub image_std: [f32; 3],
    /// Resize the codebook image.
    pub codebook_do_resize: bool,
    /// Codebook resize target.
    pub codebook_size: SizeSpec,
    /// Pillow filter code of the codebook branch (1 = LANCZOS).
    pub codebook_resample: u32,
    /// Center-crop the codebook image.
    pub codebook_do_center_crop: bool,
    /// Codebook crop size.
    pub codebook_crop_size: SizeSpec,
    /// Rescale the codebook image.
    pub codebook_do_rescale: bool,
    /// Codebook rescale factor.
    pub codebook_rescale_factor: f32,
    /// Normalise the codebook image.
    pub codebook_do_normalize: bool,
    /// Codebook mean.
    pub codebook_image_mean: [f32; 3],
    /// Codebook std.
    pub codebook_image_std: [f32; 3],
    /// Apply `0.8·x + 0.1` to the codebook image.
    pub codebook_do_map_pixels: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: SizeSpec::HeightWidth {
                height: 224,
                width: 224,
            },
            resample: 3,
            do_center_crop: true,
            crop_size: SizeSpec::HeightWidth {
                height: 224,
                width: 224,
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            codebook_do_resize: true,
            codebook_size: SizeSpec::HeightWidth {
                height: 112,
                width: 112,
            },
            codebook_resample: 1,
            codebook_do_center_crop: true,
            codebook_crop_size: SizeSpec::HeightWidth {
                height: 112,
                width: 112,
            },
            codebook_do_rescale: true,
            codebook_rescale_factor: 1.0 / 255.0,
            codebook_do_normalize: true,
            codebook_image_mean: [0.0; 3],
            codebook_image_std: [1.0; 3],
            codebook_do_map_pixels: true,
        }
    }
}

impl ImageProcessorConfig {
    /// A processor config for square images of `image_size` and a codebook at `codebook_size`.
    pub fn square(image_size: u32, codebook_size: u32) -> Self {
        let sq = |s| SizeSpec::HeightWidth { height: s, width: s };
        Self {
            size: sq(image_size),
            crop_size: sq(image_size),
            codebook_size: sq(codebook_size),
            codebook_crop_size: sq(codebook_size),
            ..Default::default()
        }
    }
}

impl ImageProcessorConfig {
    /// Checks the sizes against [`flava_vit::limits`] (a resize target of 2^20 squared would
    /// allocate terabytes) and that none is zero.
    pub fn validate(&self) -> Result<(), ProcessorError> {
        let max = flava_vit::limits::current().max_image_pixels;
        for (field, size) in [
            ("size", self.size),
            ("crop_size", self.crop_size),
            ("codebook_size", self.codebook_size),
            ("codebook_crop_size", self.codebook_crop_size),
        ] {
            let (w, h) = size.crop_size();
            check_pixels(w, h, max).map_err(|source| ProcessorError::Size { field, source })?;
        }
        Ok(())
    }
}

/// One branch's steps.
struct Branch {
    resize: Option<(SizeSpec, Filter)>,
    crop: Option<SizeSpec>,
    rescale: Option<f32>,
    normalize: Option<([f32; 3], [f32; 3])>,
    map_pixels: bool,
}

/// Reproduces HF `FlavaImageProcessor` (Pillow backend).
#[derive(Debug, Clone, Default)]
pub struct ImageProcessor {
    /// The configuration in use.
    pub config: ImageProcessorConfig,
}

/// Decodes an image file (any format of the `image` crate) with a clear error. JPEGs are decoded
/// by libjpeg-turbo (through `mozjpeg`, default islow IDCT and fancy upsampling), which gives the
/// same pixels as Pillow; pure-Rust decoders differ from it by a grey level or two.
pub fn load_image(path: impl AsRef<Path>) -> Result<DynamicImage, ProcessorError> {
    let path = path.as_ref();
    let err = |source: ImageError| ProcessorError::Image {
        path: path.into(),
        source,
    };
    let bytes = std::fs::read(path).map_err(|e| err(ImageError::Read(e.to_string())))?;
    decode_image(&bytes).map_err(err)
}

/// Decodes image bytes; see [`load_image`]. The declared size is checked against
/// [`flava_vit::limits::Limits::max_image_pixels`] before any pixel is decoded, so a small file
/// that declares a huge image (a decompression bomb) is refused without allocating.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage, ImageError> {
    let format = image::guess_format(bytes).map_err(|e| ImageError::Format(e.to_string()))?;
    let max_pixels = flava_vit::limits::current().max_image_pixels;
    let reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ImageError::Header(e.to_string()))?;
    check_pixels(w, h, max_pixels)?;
    if format == image::ImageFormat::Jpeg {
        // libjpeg pads a cut stream with grey and only warns; Pillow reports "image file is
        // truncated". A JPEG must end with its EOI marker (trailing padding aside).
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let tail = &bytes[end.saturating_sub(1024)..end];
        if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
            return Err(ImageError::Truncated);
        }
        if let Some(img) = decode_jpeg_like_pillow(bytes, max_pixels) {
            return Ok(img);
        }
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w.max(1));
    limits.max_image_height = Some(h.max(1));
    // RGBA16 of the declared size, plus the decoder's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    reader.decode().map_err(|e| ImageError::Decode(e.to_string()))
}

/// `Err` when `w × h` exceeds `max_pixels`.
fn check_pixels(width: u32, height: u32, max: u64) -> Result<(), ImageError> {
    let pixels = width as u64 * height as u64;
    if pixels > max {
        return Err(ImageError::TooLarge {
            width,
            height,
            pixels,
            max,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    Ok(())
}

/// libjpeg-turbo decoding to RGB; `None` for what it cannot do (e.g. CMYK), so that the
/// `image` crate gets a chance and reports its own error.
fn decode_jpeg_like_pillow(bytes: &[u8], max_pixels: u64) -> Option<DynamicImage> {
    std::panic::catch_unwind(|| {
        let d = mozjpeg::Decompress::new_mem(bytes).ok()?;
        // The header libjpeg read is the one that counts (the `image` crate's check came first).
        check_pixels(d.width() as u32, d.height() as u32, max_pixels).ok()?;
        if !matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_GRAYSCALE | mozjpeg::ColorSpace::JCS_RGB
        ) {
            return None;
        }
        let mut d = d.rgb().ok()?;
        let (w, h) = (d.width() as u32, d.height() as u32);
        // Flat RGB bytes, read once (no second copy of a large image).
        let raw: Vec<u8> = d.read_scanlines::<u8>().ok()?;
        d.finish().ok()?;
        RgbImage::from_raw(w, h, raw).map(DynamicImage::ImageRgb8)
    })
    .ok()
    .flatten()
}

/// Converts any decoded image to 8-bit RGB as HF's `convert_to_rgb` does: grey is replicated,
/// palettes expanded, and transparency composited onto white with Pillow's `alpha_composite`
/// integer arithmetic; 16-bit grey clips at 255 (Pillow's `I;16` conversion), 16-bit colour keeps
/// the high byte.
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    let img = match img {
        // Pillow opens 16-bit grey PNGs as mode I;16, whose RGB conversion clips at 255.
        DynamicImage::ImageLuma16(g) => {
            let (w, h) = g.dimensions();
            let raw = g.as_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect();
            return RgbImage::from_raw(w, h, raw).expect("size");
        }
        // 16-bit colour PNGs are read keeping the high byte.
        DynamicImage::ImageRgb16(_) | DynamicImage::ImageRgba16(_) | DynamicImage::ImageLumaA16(_) => {
            let rgba16 = img.to_rgba16();
            let (w, h) = rgba16.dimensions();
            let raw = rgba16.into_raw().into_iter().map(|v| (v >> 8) as u8).collect();
            DynamicImage::ImageRgba8(image::RgbaImage::from_raw(w, h, raw).expect("size"))
        }
        other => other.clone(),
    };
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let p = rgba.get_pixel(x, y).0;
        image::Rgb([0, 1, 2].map(|c| over_white(p[c], p[3])))
    })
}

/// Pillow's `alpha_composite(white, src)` for one channel (`AlphaComposite.c`, 7 extra bits).
fn over_white(v: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    const BITS: u32 = 7;
    let (v, a) = (v as u32, a as u32);
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << BITS);
    ((((tmp >> 8) + tmp) >> 8) >> BITS) as u8
}

fn center_crop(img: &RgbImage, (cw, ch): (u32, u32)) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (cw, ch) {
        return img.clone();
    }
    // HF pads with zeros when the crop is larger, then crops around the centre.
    let top = (h as i64 - ch as i64) / 2;
    let left = (w as i64 - cw as i64) / 2;
    let top = if h >= ch { top } else { -((ch as i64 - h as i64) / 2) };
    let left = if w >= cw { left } else { -((cw as i64 - w as i64) / 2) };
    RgbImage::from_fn(cw, ch, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if sx >= 0 && sy >= 0 && sx < w as i64 && sy < h as i64 {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

impl ImageProcessor {
    /// A processor with the given configuration.
    pub fn new(config: ImageProcessorConfig) -> Self {
        Self { config }
    }

    /// Reads `preprocessor_config.json` (unknown fields ignored; wrong types name the field).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ProcessorError> {
        let path = path.as_ref();
        let err = |message: String| ProcessorError::Config {
            path: path.into(),
            message,
        };
        let json = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let de = &mut serde_json::Deserializer::from_str(&json);
        let config: ImageProcessorConfig =
            serde_path_to_error::deserialize(de).map_err(|e| err(format!("field `{}`: {}", e.path(), e.inner())))?;
        config.validate().map_err(|e| err(e.to_string()))?;
        for (name, code) in [
            ("resample", config.resample),
            ("codebook_resample", config.codebook_resample),
        ] {
            if Filter::from_pil_code(code).is_none() {
                return Err(err(format!(
                    "field `{name}`: unsupported Pillow filter code {code} (use 1, 2 or 3)"
                )));
            }
        }
        Ok(Self { config })
    }

    fn encoder_branch(&self) -> Branch {
        let c = &self.config;
        Branch {
            resize: c
                .do_resize
                .then(|| (c.size, Filter::from_pil_code(c.resample).unwrap_or(Filter::Bicubic))),
            crop: c.do_center_crop.then_some(c.crop_size),
            rescale: c.do_rescale.then_some(c.rescale_factor),
            normalize: c.do_normalize.then_some((c.image_mean, c.image_std)),
            map_pixels: false,
        }
    }

    fn codebook_branch(&self) -> Branch {
        let c = &self.config;
        Branch {
            resize: c.codebook_do_resize.then(|| {
                (
                    c.codebook_size,
                    Filter::from_pil_code(c.codebook_resample).unwrap_or(Filter::Lanczos),
                )
            }),
            crop: c.codebook_do_center_crop.then_some(c.codebook_crop_size),
            rescale: c.codebook_do_rescale.then_some(c.codebook_rescale_factor),
            normalize: c
                .codebook_do_normalize
                .then_some((c.codebook_image_mean, c.codebook_image_std)),
            map_pixels: c.codebook_do_map_pixels,
        }
    }

    fn run(branch: &Branch, img: &DynamicImage) -> (Vec<f32>, u32, u32) {
        let mut rgb = to_rgb8(img);
        if let Some((size, filter)) = branch.resize {
            let (w, h) = size.output_size(rgb.width(), rgb.height());
            rgb = resize(&rgb, w, h, filter);
        }
        if let Some(crop) = branch.crop {
            rgb = center_crop(&rgb, crop.crop_size());
        }
        let (w, h) = rgb.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, p) in rgb.pixels().enumerate() {
            for ch in 0..3 {
                // HF rescales in float64 then casts to float32.
                let mut v = match branch.rescale {
                    Some(f) => (p.0[ch] as f64 * f as f64) as f32,
                    None => p.0[ch] as f32,
                };
                if let Some((mean, std)) = branch.normalize {
                    v = (v - mean[ch]) / std[ch];
                }
                if branch.map_pixels {
                    v = 0.8 * v + 0.1;
                }
                out[ch * plane + i] = v;
            }
        }
        (out, w, h)
    }

    /// Encoder pixels of one image: ([3·H·W] CHW values, width, height).
    pub fn preprocess(&self, img: &DynamicImage) -> (Vec<f32>, u32, u32) {
        Self::run(&self.encoder_branch(), img)
    }

    /// Codebook pixels of one image: ([3·H·W] CHW values, width, height).
    pub fn preprocess_codebook(&self, img: &DynamicImage) -> (Vec<f32>, u32, u32) {
        Self::run(&self.codebook_branch(), img)
    }

    fn stack(items: Vec<(Vec<f32>, u32, u32)>, device: &Device) -> Tensor<4> {
        let n = items.len();
        let (w, h) = items.first().map_or((0, 0), |i| (i.1, i.2));
        let flat: Vec<f32> = items.into_iter().flat_map(|i| i.0).collect();
        Tensor::from_data(TensorData::new(flat, [n, 3, h as usize, w as usize]), device)
    }

    /// `pixel_values` of a batch: [batch, 3, H, W]. All images end at the crop size.
    pub fn pixel_values(&self, images: &[DynamicImage], device: &Device) -> Tensor<4> {
        Self::stack(images.iter().map(|i| self.preprocess(i)).collect(), device)
    }

    /// `codebook_pixel_values` of a batch: [batch, 3, Hc, Wc].
    pub fn codebook_pixel_values(&self, images: &[DynamicImage], device: &Device) -> Tensor<4> {
        Self::stack(images.iter().map(|i| self.preprocess_codebook(i)).collect(), device)
    }
}
