//! The report's figures that need the model: the zero-shot confusion matrix and retrieval
//! examples (from the evaluation's results), and MIM targets, dVAE reconstructions and BEiT
//! masks of held-out images.

use burn::prelude::*;
use flava_data::batch::BatchBuilder;
use flava_data::stream::DecodedSample;
use flava_data::task::Task;
use flava_dvae::dvae::{unmap_pixels, Dvae};
use flava_dvae::ImageCodebook;
use image::RgbImage;

use super::{png_data_uri, Confusion, MimShown, ReportData, RetrievalShown, MAX_CONFUSION_CLASSES};
use crate::eval::EvalReport;

/// Images shown through the MIM pipeline.
pub const MIM_EXAMPLES: usize = 4;

/// The confusion matrix of `(label, predicted)` pairs over `classes`, cut to the
/// [`MAX_CONFUSION_CLASSES`] most frequent true classes (ties: the lower index).
pub fn confusion(classes: &[String], predictions: &[(usize, usize)]) -> Confusion {
    let mut freq = vec![0usize; classes.len()];
    for &(l, _) in predictions {
        if l < freq.len() {
            freq[l] += 1;
        }
    }
    let mut keep: Vec<usize> = (0..classes.len()).filter(|&c| freq[c] > 0).collect();
    keep.sort_by(|&a, &b| freq[b].cmp(&freq[a]).then(a.cmp(&b)));
    let omitted = keep.len().saturating_sub(MAX_CONFUSION_CLASSES);
    keep.truncate(MAX_CONFUSION_CLASSES);
    keep.sort_unstable();
    let pos = |c: usize| keep.binary_search(&c).ok();
    let mut counts = vec![vec![0u32; keep.len()]; keep.len()];
    for &(l, p) in predictions {
        if let (Some(i), Some(j)) = (pos(l), pos(p)) {
            counts[i][j] += 1;
        }
    }
    Confusion {
        classes: keep.iter().map(|&c| classes[c].clone()).collect(),
        counts,
        omitted,
    }
}

/// A distinct, stable colour per visual code (golden-angle hues).
pub fn code_colour(code: u32) -> [u8; 3] {
    let h = (code as f64 * 137.507_764) % 360.0;
    let (s, v) = (
        0.65 + 0.35 * ((code / 7) % 2) as f64,
        0.95 - 0.3 * ((code / 3) % 2) as f64,
    );
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r, g, b].map(|t| ((t + m) * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// `[3, s, s]` values in [0, 1] as an image.
fn planes_to_image(v: &[f32], s: usize) -> RgbImage {
    RgbImage::from_fn(s as u32, s as u32, |x, y| {
        let i = y as usize * s + x as usize;
        image::Rgb([0, 1, 2].map(|c| (v[c * s * s + i].clamp(0.0, 1.0) * 255.0).round() as u8))
    })
}

/// The image with the masked cells of a `grid`×`grid` mask darkened and tinted.
pub fn mask_overlay(img: &RgbImage, mask: &[bool], grid: usize) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut out = img.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        let cell = (y as usize * grid / h as usize) * grid + x as usize * grid / w as usize;
        if mask.get(cell).copied().unwrap_or(false) {
            let [r, g, b] = p.0;
            p.0 = [
                (r as u16 * 3 / 10 + 20) as u8,
                (g as u16 * 3 / 10 + 20) as u8,
                (b as u16 * 3 / 10 + 70) as u8,
            ];
        }
    }
    out
}

/// The evaluation's examples: confusion matrix and retrieval queries.
pub fn from_eval(report: &EvalReport, data: &mut ReportData) -> anyhow::Result<()> {
    if let Some(z) = &report.zero_shot {
        if !z.predictions.is_empty() {
            data.confusion = Some(confusion(&z.classes, &z.predictions));
        }
    }
    if let Some(r) = &report.retrieval {
        for ex in &r.examples {
            let thumb = if ex.image.width().max(ex.image.height()) > 160 {
                image::imageops::thumbnail(&ex.image, 160, 160 * ex.image.height() / ex.image.width().max(1))
            } else {
                ex.image.clone()
            };
            data.retrieval.push(RetrievalShown {
                image: png_data_uri(&thumb)?,
                top: ex.top.clone(),
            });
        }
    }
    Ok(())
}

/// Up to [`MIM_EXAMPLES`] of `samples` through the evaluation batch builder: the codebook's
/// input, its tokens, the decoder's reconstruction (when `dvae` is given) and the BEiT mask.
pub fn mim(
    samples: &[DecodedSample],
    builder: &BatchBuilder,
    codebook: &ImageCodebook,
    dvae: Option<&Dvae>,
    device: &Device,
) -> anyhow::Result<Vec<MimShown>> {
    let chosen: Vec<DecodedSample> = samples
        .iter()
        .filter(|s| s.image.is_some())
        .take(MIM_EXAMPLES)
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Ok(Vec::new());
    }
    // Index far from training's and the evaluation's batches: its own masks.
    let batch = builder.build(Task::Images, chosen, u64::MAX / 2)?;
    let (b, c) = (batch.batch_size, batch.codebook_size);
    let x = Tensor::<4>::from_data(
        TensorData::new(batch.codebook_pixel_values.clone(), [b, 3, c, c]),
        device,
    );
    let tokens: Vec<i64> = codebook
        .tokens(x.clone())
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let per = tokens.len() / b.max(1);
    let side = (per as f64).sqrt().round() as usize;
    let inputs: Vec<f32> = unmap_pixels(x.clone())
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let recon: Option<Vec<f32>> = match dvae {
        Some(d) => Some(
            d.reconstruct(x)
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        ),
        None => None,
    };
    let grid_cells = batch.grid;
    let grid = (grid_cells as f64).sqrt().round() as usize;
    let plane = 3 * c * c;
    let mut out = Vec::new();
    for i in 0..b {
        let img = planes_to_image(&inputs[i * plane..(i + 1) * plane], c);
        let codes = &tokens[i * per..(i + 1) * per];
        let mut distinct: Vec<i64> = codes.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let small = RgbImage::from_fn(side as u32, side as u32, |x, y| {
            image::Rgb(code_colour(codes[y as usize * side + x as usize] as u32))
        });
        let tokens_img = image::imageops::resize(&small, c as u32, c as u32, image::imageops::FilterType::Nearest);
        let mask = &batch.bool_masked_pos[i * grid_cells..(i + 1) * grid_cells];
        out.push(MimShown {
            image: png_data_uri(&img)?,
            tokens: png_data_uri(&tokens_img)?,
            distinct_codes: distinct.len(),
            reconstruction: match &recon {
                Some(r) => Some(png_data_uri(&planes_to_image(&r[i * plane..(i + 1) * plane], c))?),
                None => None,
            },
            masked: png_data_uri(&mask_overlay(&img, mask, grid))?,
            masked_patches: (mask.iter().filter(|&&m| m).count(), grid_cells),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_counts_and_cuts_to_the_most_frequent_classes() {
        let classes: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        let c = confusion(&classes, &[(0, 0), (0, 1), (2, 2), (2, 2), (2, 0)]);
        // Class 1 has no image: not a row.
        assert_eq!(c.classes, ["c0", "c2"]);
        assert_eq!(c.counts, vec![vec![1, 0], vec![1, 2]]);
        assert_eq!(c.omitted, 0);
        let many: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
        let preds: Vec<(usize, usize)> = (0..50).flat_map(|i| std::iter::repeat_n((i, i), 1 + i % 3)).collect();
        let c = confusion(&many, &preds);
        assert_eq!((c.classes.len(), c.omitted), (MAX_CONFUSION_CLASSES, 10));
    }

    #[test]
    fn masks_darken_exactly_their_cells_and_codes_get_distinct_colours() {
        let img = RgbImage::from_pixel(16, 16, image::Rgb([200, 200, 200]));
        let mut mask = vec![false; 4];
        mask[1] = true; // top right
        let o = mask_overlay(&img, &mask, 2);
        assert_eq!(o.get_pixel(0, 0).0, [200, 200, 200]);
        assert_ne!(o.get_pixel(12, 3).0, [200, 200, 200]);
        assert_eq!(o.get_pixel(12, 12).0, [200, 200, 200]);
        let colours: std::collections::BTreeSet<[u8; 3]> = (0..64).map(code_colour).collect();
        assert_eq!(colours.len(), 64);
    }
}
