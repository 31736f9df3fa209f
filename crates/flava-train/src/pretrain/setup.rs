//! What a pretraining run prepares before its loop: the tokenizer, the codebook, the model
//! configuration, the sources of each phase, and the final model directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use flava_data::loader::Mix;
use flava_data::processor::{ImageProcessorConfig, SizeSpec};
use flava_data::sources::Source;
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;
use flava_dvae::ImageCodebook;
use flava_fusion::checkpoint::read_config;
use flava_fusion::FlavaConfig;
use flava_objectives::checkpoint::save_pretraining;
use flava_objectives::FlavaForPretraining;
use flava_text::Tokenizer;
use serde_json::json;

use super::config::{PhaseKind, PretrainConfig};
use crate::eval::{self};
use crate::observer::Observer;

pub(super) fn source_options(cfg: &PretrainConfig, shuffle: bool) -> SourceOptions {
    SourceOptions {
        seed: cfg.seed,
        shuffle,
        shuffle_buffer: if shuffle { 1000 } else { 0 },
        synthetic_image_size: 64,
        ..Default::default()
    }
}

/// The tokenizer: given, already in the run directory, from `--init`, or trained on the run's texts.
pub(super) fn prepare_tokenizer(
    cfg: &PretrainConfig,
    observer: &mut dyn Observer,
) -> anyhow::Result<(Tokenizer, PathBuf)> {
    if let Some(p) = &cfg.tokenizer {
        return Ok((
            Tokenizer::from_file(p).with_context(|| format!("loading {}", p.display()))?,
            p.clone(),
        ));
    }
    let path = cfg.out.join("tokenizer.json");
    if path.is_file() {
        return Ok((Tokenizer::from_file(&path)?, path));
    }
    if let Some(init) = &cfg.init {
        for name in ["tokenizer.json", "vocab.txt"] {
            let p = init.join(name);
            if p.is_file() {
                return Ok((Tokenizer::from_file(&p)?, p));
            }
        }
        anyhow::bail!(
            "{} has no tokenizer.json or vocab.txt; pass --tokenizer",
            init.display()
        );
    }
    let mut texts = Vec::new();
    let opts = source_options(cfg, false);
    for (spec, task) in cfg
        .text
        .iter()
        .map(|s| (s, Task::Text))
        .chain(cfg.pairs.iter().map(|s| (s, Task::Pairs)))
    {
        let mut src = open_source(spec, task, &opts)?;
        let (samples, _) = eval::read_samples(src.as_mut(), Task::Text, 20_000);
        texts.extend(samples.into_iter().filter_map(|s| s.text));
    }
    if texts.is_empty() {
        anyhow::bail!("no text to train the tokenizer on (give --text or --pairs sources, or --tokenizer)");
    }
    let t0 = Instant::now();
    let tmp = flava_vit::atomic::tmp_path(&path);
    let n = flava_text::train::train_wordpiece(texts.clone().into_iter(), cfg.tokenizer_vocab_size, &tmp)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    observer.on_message(&format!(
        "tokenizer: WordPiece with {n} tokens trained on {} texts in {:.1}s -> {}",
        texts.len(),
        t0.elapsed().as_secs_f64(),
        path.display()
    ));
    Ok((Tokenizer::from_file(&path)?, path))
}

/// The codebook: given, from `--init`, already trained in the run directory, or trained now.
pub(super) fn prepare_codebook(
    cfg: &PretrainConfig,
    codebook_side: u32,
    device: &Device,
    observer: &mut dyn Observer,
) -> anyhow::Result<(ImageCodebook, flava_dvae::FlavaImageCodebookConfig, PathBuf)> {
    let dir = match (&cfg.codebook, &cfg.init) {
        (Some(d), _) => d.clone(),
        (None, Some(init)) => init.clone(),
        (None, None) => {
            let dvae_dir = cfg.out.join("dvae");
            let cb = dvae_dir.join("codebook");
            if !cb.join("config.json").is_file() {
                let mut dc = flava_dvae::dvae::DvaeTrainConfig::default();
                dc.codebook.vocab_size = cfg.dvae.vocab_size;
                dc.codebook.hidden_size = cfg.dvae.hidden_size;
                dc.image_size = codebook_side;
                dc.steps = cfg.dvae.steps;
                dc.time_limit_s = Some(cfg.dvae.time_limit_s);
                dc.seed = cfg.seed;
                let images = cfg
                    .images
                    .first()
                    .or(cfg.pairs.first())
                    .context("no image source for the dVAE")?;
                observer.on_message(&format!(
                    "dVAE: training a {}-code image tokenizer for up to {:.0}s on {images}",
                    dc.codebook.vocab_size, cfg.dvae.time_limit_s
                ));
                // The run's own dVAE: continue one that an interrupted run left unfinished.
                crate::dvae_cmd::train_cmd(images, &cfg.eval.images, &dvae_dir, dc, true, device, observer)?;
            }
            cb
        }
    };
    let (codebook, cb_cfg, _) = flava_dvae::load_codebook(&dir, device)
        .with_context(|| format!("loading the codebook of {}", dir.display()))?;
    Ok((codebook, cb_cfg, dir))
}

/// The FLAVA configuration: from `--init` or the preset, sized to the tokenizer and codebook.
pub(super) fn model_config(
    cfg: &PretrainConfig,
    tokenizer: &Tokenizer,
    cb: &flava_dvae::FlavaImageCodebookConfig,
) -> anyhow::Result<FlavaConfig> {
    let mut mc = match &cfg.init {
        Some(dir) => read_config(dir)?,
        None => FlavaConfig::preset(&cfg.preset)?,
    };
    let vocab = tokenizer.vocab_size();
    if cfg.init.is_some() && mc.text_config.vocab_size != vocab {
        anyhow::bail!(
            "the tokenizer has {vocab} tokens but the --init model's text vocabulary is {}",
            mc.text_config.vocab_size
        );
    }
    mc.text_config.vocab_size = vocab;
    mc.text_config.max_position_embeddings = mc.text_config.max_position_embeddings.max(cfg.max_length);
    mc.image_config.vocab_size = cb.vocab_size;
    mc.image_codebook_config = cb.clone();
    let (i, t, m) = (
        mc.image_config.hidden_size,
        mc.text_config.hidden_size,
        mc.multimodal_config.hidden_size,
    );
    if i != t || t != m {
        anyhow::bail!(
            "pretraining needs equal image/text/multimodal widths (the MMM heads read fused states); got {i}/{t}/{m}"
        );
    }
    mc.validate()?;
    Ok(mc)
}

/// The `preprocessor_config.json` that reproduces the training-time evaluation transform.
pub fn processor_config(image_size: u32, codebook_side: u32) -> ImageProcessorConfig {
    let hw = |s| SizeSpec::HeightWidth { height: s, width: s };
    ImageProcessorConfig {
        size: hw(image_size),
        crop_size: hw(image_size),
        codebook_size: hw(codebook_side),
        codebook_crop_size: hw(codebook_side),
        ..Default::default()
    }
}

/// Writes the final model directory in the HF layout.
pub(super) fn save_model_dir(
    dir: &Path,
    model: &FlavaForPretraining,
    codebook: &ImageCodebook,
    mc: &FlavaConfig,
    tokenizer_path: &Path,
    processor: &ImageProcessorConfig,
) -> anyhow::Result<()> {
    // Written whole into `model.tmp/` and swapped in: a crash never leaves a mixed directory.
    let target = dir;
    let staged = flava_vit::atomic::AtomicDir::new(target)?;
    let dir = staged.path();
    save_pretraining(model, Some(codebook), mc, dir)?;
    let tok_dst = dir.join("tokenizer.json");
    if tokenizer_path.extension().is_some_and(|e| e == "json") {
        std::fs::copy(tokenizer_path, &tok_dst)?;
    } else {
        std::fs::copy(tokenizer_path, dir.join("vocab.txt"))?;
    }
    let mut v = serde_json::to_value(processor)?;
    v["image_processor_type"] = json!("FlavaImageProcessor");
    std::fs::write(dir.join("preprocessor_config.json"), serde_json::to_string_pretty(&v)?)?;
    staged.commit()?;
    Ok(())
}

/// Sources per task.
pub(super) type TaskSources = BTreeMap<Task, Vec<Box<dyn Source>>>;

pub(super) fn sources(cfg: &PretrainConfig, phase: PhaseKind) -> anyhow::Result<(TaskSources, Mix)> {
    let opts = source_options(cfg, true);
    let mut out: TaskSources = BTreeMap::new();
    for &task in phase.tasks() {
        let specs = match task {
            Task::Pairs => &cfg.pairs,
            Task::Images => &cfg.images,
            Task::Text => &cfg.text,
        };
        for s in specs {
            out.entry(task)
                .or_default()
                .push(open_source(s, task, &opts).with_context(|| format!("opening {} source `{s}`", task.name()))?);
        }
    }
    if out.is_empty() {
        anyhow::bail!("phase `{phase}` has no data source");
    }
    let mix = match phase {
        PhaseKind::Joint => Mix::parse(&cfg.mix)?,
        PhaseKind::Only(_) => Mix::RoundRobin,
    };
    Ok((out, mix))
}

/// Files a finished or interrupted run leaves in its directory; a new run refuses to start
/// over them without `--resume` or `--force`.
pub const RUN_FILES: [&str; 12] = [
    "checkpoints",
    "model",
    "metrics.jsonl",
    "eval.json",
    "report_data.json",
    "report.html",
    "config.toml",
    "loss_curves.png",
    "dvae",
    "tokenizer.json",
    "model.tmp",
    "sgemm.txt",
];

/// The first file of a previous run found in `out`.
pub fn previous_run(out: &Path) -> Option<&'static str> {
    RUN_FILES.iter().copied().find(|f| out.join(f).exists())
}
