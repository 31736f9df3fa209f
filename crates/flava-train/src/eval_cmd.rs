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
use crate::vocabulary::{open_templates, ClassVocabulary};

/// Text length used for prompts and captions (capped by the model's positions).
pub const EVAL_MAX_LENGTH: usize = 77;

fn load(
    dir: &Path,
    device: &Device,
) -> anyhow::Result<(FlavaModel, Tokenizer, flava_data::processor::ImageProcessor, usize)> {
    let dir = &crate::hub::resolve(dir).context("--model")?;
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

/// Where zero-shot's classes and templates come from, besides `--template`.
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    /// `--classes`: `imagenet` or a class file ([`ClassVocabulary::open`]); `None`: the labels
    /// of the images.
    pub classes: Option<String>,
    /// `--templates`: `openai` or a template file ([`open_templates`]); added to `--template`.
    pub templates: Option<String>,
}

/// Zero-shot top-1/top-5 on labelled images (ImageFolder or `synthetic:classes`).
pub fn zero_shot(
    dir: &Path,
    data: &str,
    templates: &[String],
    vocab: &Vocabulary,
    max_images: usize,
    device: &Device,
) -> anyhow::Result<ZeroShot> {
    if let Some(t) = templates.iter().find(|t| !t.contains("{}")) {
        anyhow::bail!("--template `{t}` has no `{{}}` where the class name goes");
    }
    // Vocabularies first: a typo in a file name fails before the model loads.
    let classes = vocab.classes.as_deref().map(ClassVocabulary::open).transpose()?;
    let file_templates = vocab.templates.as_deref().map(open_templates).transpose()?;
    let mut templates = templates.to_vec();
    templates.extend(file_templates.into_iter().flatten());
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
        &templates[..]
    };
    eval::zero_shot(
        &model,
        &tok,
        &proc,
        &samples,
        templates,
        classes.as_ref(),
        max_len,
        device,
    )
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

/// What `flava eval classify` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Classified {
    /// The task's metrics over the labelled examples.
    #[serde(flatten)]
    pub eval: crate::task_model::TaskEval,
    /// Predictions written (labelled or not).
    pub predictions: usize,
}

/// A task model (`flava finetune`'s or a linear probe's `model/`) on task data: the task's
/// metrics, and with `predictions` one JSON line per example (id, label or answer, score).
pub fn classify(
    dir: &Path,
    data: &str,
    opts: &flava_data::tasks::TaskOptions,
    batch_size: usize,
    predictions: Option<&Path>,
    device: &Device,
    observer: &mut dyn crate::observer::Observer,
) -> anyhow::Result<Classified> {
    let tm = crate::task_model::load_task_model(dir, device)?;
    let set = flava_data::tasks::open_task(data, opts).with_context(|| format!("--data {data}"))?;
    for (reason, n) in &set.skipped {
        log::warn!("{data}: {n} record(s) skipped ({reason:?})");
    }
    if set.kind != tm.batcher.head.kind {
        anyhow::bail!(
            "{data} is a {:?} task but the model's head reads the {} encoder",
            set.kind,
            tm.classifier.tower
        );
    }
    let scored = crate::task_model::predict(&tm.model, &tm.batcher, &set.examples, batch_size, device, observer)?;
    let preds = scored.predictions(&tm.batcher.head);
    if let Some(path) = predictions {
        let mut out = String::new();
        for p in &preds {
            out.push_str(&serde_json::to_string(p)?);
            out.push('\n');
        }
        flava_vit::atomic::write_file(path, out.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    let eval = scored.eval(&tm.batcher.head);
    if eval.n == 0 && preds.is_empty() {
        anyhow::bail!("{data}: no usable example ({} skipped)", eval.skipped);
    }
    Ok(Classified {
        eval,
        predictions: preds.len(),
    })
}
