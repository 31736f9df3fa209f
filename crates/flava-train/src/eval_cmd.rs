//! `flava eval zero-shot` and `flava eval retrieval` on a model directory (ours or HF's).

use std::path::Path;

use anyhow::Context;
use burn::prelude::*;
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;
use flava_fusion::{load_flava_model, FlavaModel};
use flava_text::Tokenizer;

use crate::embed::{find_processor, find_tokenizer};
use crate::eval::{self, Retrieval, ZeroShot};

/// Text length used for prompts and captions (capped by the model's positions).
pub const EVAL_MAX_LENGTH: usize = 77;

fn load(
    dir: &Path,
    device: &Device,
) -> anyhow::Result<(FlavaModel, Tokenizer, flava_data::processor::ImageProcessor, usize)> {
    let loaded = load_flava_model(dir, device).with_context(|| format!("loading {}", dir.display()))?;
    let max_len = EVAL_MAX_LENGTH.min(loaded.config.text_config.max_position_embeddings);
    Ok((loaded.model, find_tokenizer(dir)?, find_processor(dir)?, max_len))
}

fn no_shuffle() -> SourceOptions {
    SourceOptions {
        shuffle: false,
        shuffle_buffer: 0,
        ..Default::default()
    }
}

/// Zero-shot top-1/top-5 on labelled images (ImageFolder or `synthetic:classes`).
pub fn zero_shot(
    dir: &Path,
    data: &str,
    templates: &[String],
    max_images: usize,
    device: &Device,
) -> anyhow::Result<ZeroShot> {
    if let Some(t) = templates.iter().find(|t| !t.contains("{}")) {
        anyhow::bail!("--template `{t}` has no `{{}}` where the class name goes");
    }
    let (model, tok, proc, max_len) = load(dir, device)?;
    let mut src = open_source(data, Task::Images, &no_shuffle()).with_context(|| format!("opening {data}"))?;
    let (samples, skipped) = eval::read_samples(src.as_mut(), Task::Images, max_images);
    if skipped > 0 {
        log::warn!("{skipped} image(s) skipped");
    }
    if samples.is_empty() {
        anyhow::bail!("{data}: no usable image ({skipped} skipped)");
    }
    // The synthetic classes name a colour and a pattern, not an object: prompt them as captions.
    let synthetic_templates;
    let templates = if templates.is_empty() && data.starts_with("synthetic") {
        synthetic_templates = flava_data::synthetic::class_templates();
        &synthetic_templates[..]
    } else {
        templates
    };
    eval::zero_shot(&model, &tok, &proc, &samples, templates, max_len, device)
}

/// R@1/5/10 both ways on image-caption pairs.
pub fn retrieval(dir: &Path, pairs: &str, max_pairs: usize, device: &Device) -> anyhow::Result<Retrieval> {
    let (model, tok, proc, max_len) = load(dir, device)?;
    let mut src = open_source(pairs, Task::Pairs, &no_shuffle()).with_context(|| format!("opening {pairs}"))?;
    let (samples, skipped) = eval::read_samples(src.as_mut(), Task::Pairs, max_pairs);
    if skipped > 0 {
        log::warn!("{skipped} pair(s) skipped");
    }
    if samples.is_empty() {
        anyhow::bail!("{pairs}: no usable pair ({skipped} skipped)");
    }
    eval::retrieval(&model, &tok, &proc, &samples, max_len, device)
}
