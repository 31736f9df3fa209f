//! `flava pretrain`: trains (when not given) a WordPiece tokenizer and a dVAE codebook, then
//! FLAVA with all six losses over round-robin image, text and paired batches; checkpoints,
//! exact resume, a non-finite-loss guard, metrics, loss curves, a final HF-layout model
//! directory and an evaluation.
//!
//! Run directory (`--out`): `config.toml`, `tokenizer.json`, `dvae/` (its `codebook/`),
//! `checkpoints/step-N/`, `metrics.jsonl`, `loss_curves.png`, `model/` (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `preprocessor_config.json`), `eval.json`.

pub mod checkpoint;
pub mod config;
pub mod objective;
pub mod plot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::prelude::*;
use flava_data::batch::{BatchBuilder, BatchConfig};
use flava_data::loader::{DataLoader, LoaderConfig, Mix};
use flava_data::masking::BlockMaskConfig;
use flava_data::processor::{ImageProcessor, ImageProcessorConfig, SizeSpec};
use flava_data::sources::Source;
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;
use flava_data::transforms::TrainTransformConfig;
use flava_dvae::ImageCodebook;
use flava_fusion::checkpoint::read_config;
use flava_fusion::FlavaConfig;
use flava_objectives::checkpoint::{load_pretraining, save_pretraining};
use flava_objectives::{FlavaForPretraining, StepOptions};
use flava_text::Tokenizer;
use serde_json::json;

use crate::eval::{self, EvalReport};
use crate::observer::Observer;
use crate::run_dir::{sha256_file, RunDir};
use crate::trainer::{Strategy, Trainer, TrainerConfig};
pub use checkpoint::TrainState;
use config::{PhaseKind, PretrainConfig};
use flava_data::stream::StreamStats;
pub use objective::{to_pretraining, Pretraining};

/// What a finished run reports.
#[derive(Debug)]
pub struct RunSummary {
    /// Optimizer steps done in total.
    pub steps: usize,
    /// Non-finite losses skipped.
    pub nonfinite: usize,
    /// The final model directory.
    pub model_dir: PathBuf,
    /// The evaluation, unless skipped.
    pub eval: Option<EvalReport>,
    /// Seconds of FLAVA training in this invocation.
    pub train_seconds: f64,
    /// Samples and skips per source over the whole run.
    pub data: BTreeMap<String, StreamStats>,
}

fn source_options(cfg: &PretrainConfig, shuffle: bool) -> SourceOptions {
    SourceOptions {
        seed: cfg.seed,
        shuffle,
        shuffle_buffer: if shuffle { 1000 } else { 0 },
        synthetic_image_size: 64,
        ..Default::default()
    }
}

/// The tokenizer: given, already in the run directory, from `--init`, or trained on the run's texts.
fn prepare_tokenizer(cfg: &PretrainConfig, observer: &mut dyn Observer) -> anyhow::Result<(Tokenizer, PathBuf)> {
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
fn prepare_codebook(
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
fn model_config(
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
fn save_model_dir(
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
type TaskSources = BTreeMap<Task, Vec<Box<dyn Source>>>;

fn sources(cfg: &PretrainConfig, phase: PhaseKind) -> anyhow::Result<(TaskSources, Mix)> {
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
pub const RUN_FILES: [&str; 9] = [
    "checkpoints",
    "model",
    "metrics.jsonl",
    "eval.json",
    "config.toml",
    "loss_curves.png",
    "dvae",
    "tokenizer.json",
    "model.tmp",
];

/// The first file of a previous run found in `out`.
pub fn previous_run(out: &Path) -> Option<&'static str> {
    RUN_FILES.iter().copied().find(|f| out.join(f).exists())
}

/// Adds `b` to `a`, source by source.
fn merge_stats(a: &BTreeMap<String, StreamStats>, b: &BTreeMap<String, StreamStats>) -> BTreeMap<String, StreamStats> {
    let mut out = a.clone();
    for (k, v) in b {
        out.entry(k.clone()).or_default().merge(v);
    }
    out
}

/// One line per source: samples and skips by reason.
pub fn render_data_summary(data: &BTreeMap<String, StreamStats>) -> String {
    let mut out = String::new();
    for (source, st) in data {
        out.push_str(&format!(
            "data {source}: {} samples, {} skipped ({})\n",
            st.samples,
            st.total_skipped(),
            st.reasons()
        ));
    }
    out
}

/// Loss curves from `metrics.jsonl`: the total per task and each loss.
fn write_curves(metrics: &Path, png: &Path) -> anyhow::Result<()> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in std::fs::read_to_string(metrics)?.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(step), Some(task)) = (v["step"].as_f64(), v["task"].as_str()) else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64().filter(|l| l.is_finite()) {
            series.entry(format!("total ({task})")).or_default().push((step, l));
        }
        for name in ["mim", "mlm", "itm", "global_contrastive", "mmm_image", "mmm_text"] {
            if let Some(l) = v[name].as_f64().filter(|l| l.is_finite()) {
                series.entry(name.to_string()).or_default().push((step, l));
            }
        }
    }
    let tmp = flava_vit::atomic::tmp_path(png).with_extension("tmp.png");
    plot::plot_losses(&series, &tmp)?;
    std::fs::rename(&tmp, png)?;
    Ok(())
}

/// Masked-prediction accuracy on held-out data: MLM on texts, MIM on images (targets from the
/// codebook), with the same masking as training.
pub fn masked_accuracy(
    model: &FlavaForPretraining,
    codebook: &ImageCodebook,
    builder: &BatchBuilder,
    cfg: &PretrainConfig,
    device: &Device,
) -> anyhow::Result<(f64, f64)> {
    let opts = source_options(cfg, false);
    let mut result = [0.0f64; 2];
    for (k, (spec, task)) in [(&cfg.eval.text, Task::Text), (&cfg.eval.images, Task::Images)]
        .into_iter()
        .enumerate()
    {
        let mut src = open_source(spec, task, &opts)?;
        let (samples, _) = eval::read_samples(src.as_mut(), task, cfg.eval.masked_samples);
        let (mut hit, mut total) = (0usize, 0usize);
        for (i, chunk) in samples.chunks(eval::CHUNK).enumerate() {
            let host = builder.build(task, chunk.to_vec(), 1_000_000 + i as u64)?;
            let batch = to_pretraining(&host, device);
            let out = model.forward(
                &batch,
                &StepOptions {
                    codebook: Some(codebook),
                    ..Default::default()
                },
            )?;
            let (logits, targets): (Option<Tensor<2>>, Vec<usize>) = match task {
                Task::Text => (out.logits.mlm, batch.mlm.map(|m| m.targets).unwrap_or_default()),
                _ => {
                    let t = out.mim_targets.unwrap_or_default();
                    let mask = &host.bool_masked_pos;
                    let targets = (0..mask.len().min(t.len()))
                        .filter(|&j| mask[j])
                        .map(|j| t[j])
                        .collect();
                    (out.logits.mim, targets)
                }
            };
            if let Some(l) = logits {
                let pred: Vec<i64> = l
                    .argmax(1)
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .unwrap_or_default();
                hit += pred.iter().zip(&targets).filter(|(p, t)| **p as usize == **t).count();
                total += targets.len();
            }
        }
        result[k] = hit as f64 / total.max(1) as f64;
    }
    Ok((result[0], result[1]))
}

/// The evaluation of a trained model (zero-shot, retrieval, MLM/MIM accuracy).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &FlavaForPretraining,
    codebook: &ImageCodebook,
    tokenizer: &Tokenizer,
    processor: &ImageProcessor,
    builder: &BatchBuilder,
    mc: &FlavaConfig,
    cfg: &PretrainConfig,
    device: &Device,
) -> anyhow::Result<EvalReport> {
    let opts = source_options(cfg, false);
    let mut zs_src = open_source(&cfg.eval.zero_shot, Task::Images, &opts)?;
    let (zs_samples, skipped) = eval::read_samples(zs_src.as_mut(), Task::Images, cfg.eval.zero_shot_images);
    if zs_samples.is_empty() {
        anyhow::bail!(
            "evaluation: {} has no usable image ({skipped} skipped)",
            cfg.eval.zero_shot
        );
    }
    let zero_shot = eval::zero_shot(
        &model.flava,
        tokenizer,
        processor,
        &zs_samples,
        &cfg.eval.templates,
        cfg.max_length,
        device,
    )?;
    let mut r_src = open_source(&cfg.eval.retrieval, Task::Pairs, &opts)?;
    let (pairs, skipped) = eval::read_samples(r_src.as_mut(), Task::Pairs, cfg.eval.retrieval_pairs);
    if pairs.is_empty() {
        anyhow::bail!(
            "evaluation: {} has no usable pair ({skipped} skipped)",
            cfg.eval.retrieval
        );
    }
    let retrieval = eval::retrieval(&model.flava, tokenizer, processor, &pairs, cfg.max_length, device)?;
    let (mlm, mim) = masked_accuracy(model, codebook, builder, cfg, device)?;
    let chance = eval::chance_levels(
        Some(zero_shot.classes.len()),
        Some(&retrieval),
        mc.text_config.vocab_size,
        mc.image_config.vocab_size,
    );
    Ok(EvalReport {
        zero_shot: Some(zero_shot),
        retrieval: Some(retrieval),
        mlm_accuracy: Some(mlm),
        mim_accuracy: Some(mim),
        chance,
    })
}

/// Runs `flava pretrain` with `cfg`, messages printed to stderr.
pub fn run(cfg: &PretrainConfig) -> anyhow::Result<RunSummary> {
    run_with(cfg, &mut crate::observer::Quiet)
}

/// Runs `flava pretrain` with `cfg`: tokenizer, codebook (a dVAE trained when not given),
/// FLAVA in phases with checkpoints, the model directory and the evaluation. Progress,
/// messages and each step's metrics go to `observer`.
pub fn run_with(cfg: &PretrainConfig, observer: &mut dyn Observer) -> anyhow::Result<RunSummary> {
    cfg.validate()?;
    flava_vit::limits::set(cfg.limits);
    let out = cfg.out.clone();
    if !cfg.resume {
        if let Some(found) = previous_run(&out) {
            if !cfg.force {
                anyhow::bail!(
                    "{} already holds a run ({found}); pass --resume to continue it, --force to start over, or choose another --out",
                    out.display()
                );
            }
            for f in RUN_FILES {
                let p = out.join(f);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else if p.exists() {
                    std::fs::remove_file(&p)?;
                }
            }
            observer.on_message(&format!("--force: removed the previous run in {}", out.display()));
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    flava_vit::atomic::recover_dir(&out.join("model"));
    let run_dir = RunDir::new(&out);
    let partial = run_dir.remove_partial();
    if partial > 0 {
        observer.on_message(&format!(
            "removed {partial} incomplete checkpoint(s) left by an interrupted run"
        ));
    }
    let config_path = out.join("config.toml");
    if cfg.resume && config_path.is_file() {
        let saved = PretrainConfig::from_toml_file(&config_path)?;
        cfg.check_resumable(&saved)?;
    }
    if cfg.resume && run_dir.checkpoints().is_empty() {
        observer.on_message(&format!(
            "--resume: no checkpoint in {}; starting from scratch",
            out.display()
        ));
    }
    flava_vit::atomic::write_file(&config_path, cfg.to_toml().as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;

    // Data parallelism: the first of `devices` is the main one (optimizer, checkpoints).
    let dp_devices: Vec<Device> = cfg
        .devices
        .iter()
        .map(|d| crate::pick_device(d))
        .collect::<anyhow::Result<_>>()?;
    let device = match dp_devices.first() {
        Some(d) if dp_devices.len() > 1 => d.clone(),
        _ => crate::pick_device(&cfg.device)?,
    };
    device.seed(cfg.seed);
    let ad = device.clone().autodiff();

    let (tokenizer, tokenizer_path) = prepare_tokenizer(cfg, observer)?;
    let preset_cfg = match &cfg.init {
        Some(dir) => read_config(dir)?,
        None => FlavaConfig::preset(&cfg.preset)?,
    };
    let image_size = preset_cfg.image_config.image_size as u32;
    let grid = image_size as usize / preset_cfg.image_config.patch_size;
    let codebook_side = 8 * grid as u32;
    let (codebook, cb_cfg, codebook_dir) = prepare_codebook(cfg, codebook_side, &device, observer)?;
    let mc = model_config(cfg, &tokenizer, &cb_cfg)?;
    if dp_devices.len() > 1 {
        observer.on_message(&format!(
            "data parallel over {} devices: {} (batch {} = {} per device per micro-batch)",
            dp_devices.len(),
            cfg.devices.join(", "),
            cfg.batch_size,
            cfg.batch_size / (cfg.accumulate * dp_devices.len())
        ));
    }

    // Seeded here, after the dVAE (which seeds and draws on its own), so the initial weights
    // depend on the seed alone.
    device.seed(cfg.seed);
    let model = match &cfg.init {
        Some(dir) => {
            let l = load_pretraining(dir, true, &ad).with_context(|| format!("loading --init {}", dir.display()))?;
            observer.on_message(&format!("init from {}: {}", dir.display(), l.report));
            l.model
        }
        None => FlavaForPretraining::new(&mc, &ad),
    };
    let strategy = if dp_devices.len() > 1 {
        Strategy::DataParallel {
            devices: dp_devices.clone(),
            accumulate: cfg.accumulate,
        }
    } else if cfg.accumulate > 1 {
        Strategy::Accumulate(cfg.accumulate)
    } else {
        Strategy::Single
    };
    let mut trainer = Trainer::new(
        model,
        Pretraining::new(codebook.clone(), strategy, &device),
        TrainerConfig {
            optimizer: cfg.optimizer(),
            steps: cfg.steps,
            max_nonfinite: cfg.max_nonfinite,
        },
    );
    let mut state = TrainState::default();
    if cfg.resume {
        // The newest checkpoint that verifies and loads; a damaged one falls back to the one before.
        let resumed = run_dir.resume(
            |dir, st: TrainState| {
                trainer.load_records(dir, st.counters)?;
                Ok(st)
            },
            observer,
        )?;
        if let Some(r) = resumed {
            state = r.value;
            observer.on_message(&format!(
                "resumed from {} (step {})",
                r.dir.display(),
                state.counters.step
            ));
        }
    }
    // The codebook and tokenizer must be the ones the checkpoint was trained with.
    let mut fingerprints = BTreeMap::new();
    fingerprints.insert("tokenizer".to_string(), sha256_file(&tokenizer_path)?);
    if let Some(w) = ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| codebook_dir.join(f))
        .find(|p| p.is_file())
    {
        fingerprints.insert("codebook".to_string(), sha256_file(&w)?);
    }
    for (what, hash) in &state.fingerprints {
        if fingerprints.get(what) != Some(hash) {
            anyhow::bail!(
                "--resume: the {what} differs from the one this run was trained with (was it retrained or replaced?); start a new run, or restore the original {what}"
            );
        }
    }
    state.fingerprints = fingerprints;
    if let Some(w) = cfg.weights {
        let mut model = trainer.model().clone();
        model.weights = w;
        trainer.set_model(model);
    }
    let groups = trainer.optimizer().groups();
    observer.on_message(&format!(
        "model: preset {}, {} parameter tensors, {:.2}M trainable; text vocab {}, image vocab {} ({})",
        cfg.init
            .as_ref()
            .map_or(cfg.preset.clone(), |d| d.display().to_string()),
        groups.tensors,
        groups.trainable as f64 / 1e6,
        mc.text_config.vocab_size,
        mc.image_config.vocab_size,
        codebook_dir.display()
    ));

    let num_patches = grid * grid;
    let masking = cfg.mask_patches.unwrap_or((num_patches * 2).div_ceil(5));
    let batch_cfg = BatchConfig {
        batch_size: cfg.batch_size,
        transform: TrainTransformConfig {
            image_size,
            codebook_size: codebook_side,
            ..Default::default()
        },
        train: true,
        mask: BlockMaskConfig {
            height: grid,
            width: grid,
            num_masking_patches: masking,
            min_num_patches: (masking / 4).clamp(1, 16),
            ..Default::default()
        },
        max_length: cfg.max_length,
        itm_negative_prob: cfg.itm_negative_prob,
        seed: cfg.seed,
        ..Default::default()
    };
    let builder = BatchBuilder::new(batch_cfg.clone(), Some(tokenizer.clone()))?;

    let mut metrics = run_dir.metrics(state.counters.step)?;
    let metrics_path = metrics.path().to_path_buf();

    let phases = cfg.phases()?;
    let total = cfg.steps;
    let stop_at = cfg.stop_after.map_or(total, |n| (state.counters.step + n).min(total));
    observer.on_train_start("flava", trainer.step_count(), total);
    let started = Instant::now();
    let save = |trainer: &Trainer<Pretraining>, state: &TrainState, observer: &mut dyn Observer| {
        let mut state = state.clone();
        state.counters = trainer.counters;
        run_dir.save_checkpoint(
            state.counters.step,
            &state,
            cfg.keep_checkpoints,
            |dir| trainer.save_records(dir),
            observer,
        )
    };
    let mut phase_start = 0;
    for (pi, phase) in phases.iter().enumerate() {
        let phase_end = phase_start + phase.steps;
        let step = trainer.step_count();
        if step >= phase_end || step >= stop_at {
            phase_start = phase_end;
            continue;
        }
        let resume_mixer = if state.phase == pi { state.mixer.take() } else { None };
        state.phase = pi;
        let (srcs, mix) = sources(cfg, phase.kind)?;
        let mut loader = DataLoader::new(
            srcs,
            builder.clone(),
            LoaderConfig {
                mix,
                workers: cfg.workers,
                prefetch: 4,
                seed: cfg.seed.wrapping_add(pi as u64),
            },
            resume_mixer,
        )?;
        if step == phase_start {
            for d in loader.describe() {
                observer.on_message(&format!("phase {} data: {d}", phase.kind));
            }
        }
        // Counts since this loader started, added to those of earlier phases and invocations.
        let data_base = state.data.clone();
        while trainer.step_count() < phase_end.min(stop_at) {
            let t0 = Instant::now();
            let lb = match loader.next_batch() {
                Ok(lb) => lb,
                Err(e) => {
                    observer.on_train_end();
                    if trainer.step_count() > 0 {
                        // Keep the work done so far: the next --resume starts here.
                        let dir = save(&trainer, &state, observer)?;
                        observer.on_message(&format!("saved {} before stopping", dir.display()));
                    }
                    anyhow::bail!("data: {e}");
                }
            };
            let host = &lb.batch;
            let mut m = trainer.step(host, observer)?;
            state.mixer = Some(lb.state_after.clone());
            state.data = merge_stats(&data_base, &lb.per_source);
            if !m.updated {
                if trainer.too_many_nonfinite() {
                    let dir = save(&trainer, &state, observer)?;
                    observer.on_train_end();
                    anyhow::bail!(
                        "{} non-finite losses in a row at step {}: stopped and saved {} (lower --lr, raise --warmup or check the data)",
                        trainer.counters.nonfinite_consecutive,
                        trainer.step_count(),
                        dir.display()
                    );
                }
                continue;
            }
            state.samples += host.batch_size as u64;
            // The step's time includes waiting for its batch.
            m.step_time_s = t0.elapsed().as_secs_f64();
            state.train_seconds += m.step_time_s;
            let mut line = m.to_json();
            line["skipped"] = json!(state.data.values().map(StreamStats::total_skipped).sum::<u64>());
            metrics.write(&line)?;
            let step = trainer.step_count();
            if cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every) && step < total {
                save(&trainer, &state, observer)?;
            }
        }
        drop(loader);
        phase_start = phase_end;
    }
    observer.on_train_end();
    metrics.flush()?;
    state.counters = trainer.counters;
    if run_dir.latest_step() != Some(state.counters.step) {
        save(&trainer, &state, observer)?;
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let counters = state.counters;
    if counters.step < total {
        observer.on_message(&format!(
            "stopped after step {} of {total} (--stop-after); continue with --resume",
            counters.step
        ));
        return Ok(RunSummary {
            steps: counters.step,
            nonfinite: counters.nonfinite_total,
            model_dir: out.join("model"),
            eval: None,
            train_seconds,
            data: state.data,
        });
    }
    observer.on_message(&format!(
        "trained {} steps ({} samples) in {:.0}s; {} non-finite loss(es) skipped",
        counters.step, state.samples, state.train_seconds, counters.nonfinite_total
    ));
    observer.on_message(render_data_summary(&state.data).trim_end());

    let valid = trainer.model().valid();
    let model_dir = out.join("model");
    let proc_cfg = processor_config(image_size, codebook_side);
    save_model_dir(&model_dir, &valid, &codebook, &mc, &tokenizer_path, &proc_cfg)?;
    observer.on_message(&format!("model (HF layout) in {}", model_dir.display()));
    if let Err(e) = write_curves(&metrics_path, &out.join("loss_curves.png")) {
        observer.on_message(&format!("warning: loss curves not drawn: {e}"));
    }
    let eval = if cfg.eval.skip {
        None
    } else {
        let eval_cfg = BatchConfig {
            train: false,
            ..batch_cfg
        };
        let eval_builder = BatchBuilder::new(eval_cfg, Some(tokenizer.clone()))?;
        let processor = ImageProcessor::new(proc_cfg);
        let report = evaluate(
            &valid,
            &codebook,
            &tokenizer,
            &processor,
            &eval_builder,
            &mc,
            cfg,
            &device,
        )?;
        let mut v = serde_json::to_value(&report)?;
        v["data"] = serde_json::to_value(&state.data)?;
        flava_vit::atomic::write_file(&out.join("eval.json"), serde_json::to_string_pretty(&v)?.as_bytes())?;
        Some(report)
    };
    Ok(RunSummary {
        steps: counters.step,
        nonfinite: counters.nonfinite_total,
        model_dir,
        eval,
        train_seconds,
        data: state.data,
    })
}
