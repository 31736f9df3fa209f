//! `flava dvae train` and `flava dvae reconstruct`.

use std::path::Path;

use anyhow::Context;
use burn::prelude::*;
use flava_data::processor::{load_image, to_rgb8};
use flava_data::spec::{open_source, SourceOptions};
use flava_data::stream::SampleStream;
use flava_data::task::Task;
use flava_data::transforms::eval_transform;
use flava_dvae::dvae::{evaluate, unmap_pixel, DvaeEval, DvaeTrainConfig};

pub use crate::dvae::remove_previous;
use crate::dvae::{load_trained, read_images, train};
use crate::observer::Observer;

/// Trains a dVAE and evaluates it on `eval` (held-out images); writes `eval.json`.
pub fn train_cmd(
    images: &str,
    eval_spec: &str,
    out: &Path,
    mut cfg: DvaeTrainConfig,
    resume: bool,
    device: &Device,
    observer: &mut dyn Observer,
) -> anyhow::Result<DvaeEval> {
    cfg.decoder.vocab_size = cfg.codebook.vocab_size;
    let opts = SourceOptions {
        seed: cfg.seed,
        synthetic_image_size: cfg.image_size,
        ..Default::default()
    };
    cfg.validate()?;
    let source = open_source(images, Task::Images, &opts)?;
    let trained = train(&cfg, source, out, resume, device, observer)?;
    observer.on_message(&format!(
        "data {images}: {} samples, {} skipped ({})",
        trained.data.samples,
        trained.data.total_skipped(),
        trained.data.reasons()
    ));
    let mut eval_stream = SampleStream::new(open_source(
        eval_spec,
        Task::Images,
        &SourceOptions { shuffle: false, ..opts },
    )?);
    let held = read_images(&mut eval_stream, 256, &cfg, 0)?;
    let s = cfg.image_size as usize;
    let ev = evaluate(&trained.model, &held, &trained.state.mean_image, s, &device.clone());
    flava_vit::atomic::write_file(&out.join("eval.json"), serde_json::to_string_pretty(&ev)?.as_bytes())?;
    observer.on_message(&format!(
        "held-out ({} images of {eval_spec}): PSNR {:.2} dB vs {:.2} dB for the mean image ({:+.2} dB); codes used {:.1}%, perplexity {:.0}",
        ev.images,
        ev.psnr,
        ev.baseline_psnr,
        ev.psnr - ev.baseline_psnr,
        100.0 * ev.codes_used,
        ev.perplexity
    ));
    observer.on_message(&format!("codebook (HF layout) in {}", out.join("codebook").display()));
    Ok(ev)
}

/// Writes the original and its reconstruction side by side.
pub fn reconstruct_cmd(model_dir: &Path, image: &Path, out: &Path, force: bool, device: &Device) -> anyhow::Result<()> {
    let (model, cfg) = load_trained(model_dir, device).context("loading the dVAE")?;
    let s = cfg.image_size;
    let img = to_rgb8(&load_image(image)?);
    let two = eval_transform(&img, s, s);
    let x = Tensor::<4>::from_data(
        TensorData::new(two.codebook.clone(), [1, 3, s as usize, s as usize]),
        device,
    );
    let rec: Vec<f32> = model
        .reconstruct(x)
        .into_data()
        .convert::<f32>()
        .try_into_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let plane = (s * s) as usize;
    let px = |v: &[f32], unmap: bool, i: usize, c: usize| {
        let x = v[c * plane + i];
        let x = if unmap { unmap_pixel(x as f64) as f32 } else { x };
        (x.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let side = image::RgbImage::from_fn(2 * s, s, |x, y| {
        let (src, unmap, xx) = if x < s {
            (&two.codebook, true, x)
        } else {
            (&rec, false, x - s)
        };
        let i = (y * s + xx) as usize;
        image::Rgb([px(src, unmap, i, 0), px(src, unmap, i, 1), px(src, unmap, i, 2)])
    });
    crate::save_image_file(&side, out, force)?;
    Ok(())
}
