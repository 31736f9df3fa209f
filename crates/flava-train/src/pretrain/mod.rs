//! `flava pretrain`: trains (when not given) a WordPiece tokenizer and a dVAE codebook, then
//! FLAVA with all six losses over round-robin image, text and paired batches; checkpoints,
//! exact resume, a non-finite-loss guard, metrics, loss curves, a final HF-layout model
//! directory and an evaluation.
//!
//! Run directory (`--out`): `config.toml`, `tokenizer.json`, `dvae/` (its `codebook/`),
//! `checkpoints/step-N/`, `metrics.jsonl`, `loss_curves.png`, `model/` (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `preprocessor_config.json`), `eval.json`,
//! `report_data.json` and `report.html` ([`crate::report`]).

pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod objective;
pub mod plot;
mod setup;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::prelude::*;
use flava_data::batch::{BatchBuilder, BatchConfig};
use flava_data::loader::{DataLoader, LoaderConfig};
use flava_data::masking::BlockMaskConfig;
use flava_data::processor::ImageProcessor;
use flava_data::transforms::TrainTransformConfig;
use flava_fusion::checkpoint::read_config;
use flava_fusion::FlavaConfig;
use flava_objectives::checkpoint::load_pretraining;
use flava_objectives::FlavaForPretraining;
use serde_json::json;

use crate::eval::EvalReport;
use crate::observer::Observer;
use crate::run_dir::{sha256_file, RunDir};
use crate::trainer::{Strategy, Trainer, TrainerConfig};
pub use checkpoint::TrainState;
use config::PretrainConfig;
pub use evaluate::evaluate;
use flava_data::stream::StreamStats;
pub use objective::{to_pretraining, Pretraining};
use setup::{model_config, prepare_codebook, prepare_tokenizer, save_model_dir, sources};
pub use setup::{previous_run, processor_config, RUN_FILES};

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
    // Hub ids in `init` / `codebook` become their local snapshots (config.toml keeps the ids).
    let mut resolved = cfg.clone();
    for (flag, p) in [("--init", &mut resolved.init), ("--codebook", &mut resolved.codebook)] {
        if let Some(p) = p {
            *p = crate::hub::resolve(p).context(flag)?;
        }
    }
    let cfg = &resolved;

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
        run_dir.save_trainer(trainer, state, cfg.keep_checkpoints, observer)
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
    run_dir.finish(&trainer, &mut state, cfg.keep_checkpoints, &mut metrics, observer)?;
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
        // The run's own dVAE (trained in `dvae/`) has a decoder for the report's reconstructions.
        let dvae_dir = codebook_dir
            .parent()
            .filter(|d| d.join("decoder.safetensors").is_file());
        let dvae = match dvae_dir.map(|d| crate::dvae::load_trained(d, &device)) {
            Some(Ok((d, _))) => Some(d),
            Some(Err(e)) => {
                observer.on_message(&format!(
                    "warning: the dVAE decoder did not load ({e:#}); the report shows no reconstructions"
                ));
                None
            }
            None => None,
        };
        let (report, examples) = evaluate(
            &valid,
            &codebook,
            dvae.as_ref(),
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
        crate::report::write_data(&out, &examples)?;
        Some(report)
    };
    match crate::report::write(&out) {
        Ok(p) => observer.on_message(&format!("report: {}", p.display())),
        Err(e) => observer.on_message(&format!("warning: report not written: {e:#}")),
    }
    Ok(RunSummary {
        steps: counters.step,
        nonfinite: counters.nonfinite_total,
        model_dir,
        eval,
        train_seconds,
        data: state.data,
    })
}
