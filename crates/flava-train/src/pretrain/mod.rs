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
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::prelude::*;
use flava_data::batch::{BatchBuilder, BatchConfig};
use flava_data::loader::{DataLoader, LoaderConfig, LoaderError, MixerState, Shares};
use flava_data::masking::BlockMaskConfig;
use flava_data::processor::ImageProcessor;
use flava_data::transforms::TrainTransformConfig;
use flava_fusion::checkpoint::read_config;
use flava_fusion::FlavaConfig;
use flava_objectives::checkpoint::load_pretraining;
use flava_objectives::{
    all_gather_json, broadcast_module, materialize, FlavaForPretraining, ProcessGroup, SingleProcess,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::distributed::{
    broadcast_json, check_same_config, files_in, local_rank, rank_device, share_files, Group, Scratch,
};
use crate::eval::EvalReport;
use crate::observer::Observer;
use crate::run_dir::{sha256_file, RunDir, RunState};
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
    run_in_group(cfg, &Group::new(Arc::new(SingleProcess)), observer)
}

/// A step's data on one rank, as the ranks exchange it before computing (so a rank whose data
/// failed stops every rank at the same step, and rank 0 can checkpoint every rank's position).
#[derive(Serialize, Deserialize)]
struct RankData {
    error: Option<String>,
    mixer: Option<MixerState>,
    per_source: BTreeMap<String, StreamStats>,
}

/// [`run_with`] as one rank of `group` (a job launched with `mpiexec`, see
/// [`crate::distributed`]): every rank trains on its share of each global batch of
/// `cfg.batch_size` samples and takes the same update; rank 0 prepares the tokenizer and codebook,
/// chooses the checkpoint to resume from and writes everything into `cfg.out` (checkpoints with
/// every rank's data position, metrics, model, evaluation, report); the other ranks write
/// nothing there. With a group of one it is [`run_with`].
pub fn run_in_group(cfg: &PretrainConfig, group: &Group, observer: &mut dyn Observer) -> anyhow::Result<RunSummary> {
    let (rank, world) = (group.get().rank(), group.get().world());
    let rank0 = rank == 0;
    cfg.validate()?;
    let data_shares = cfg.check_processes(world)?;
    if world > 1 {
        check_same_config(group.get(), &cfg.to_toml())?;
    }
    let mut cfg_written = cfg.clone();
    // The run's share count is kept, so a resume with another number of processes that divides
    // it reads the same data.
    cfg_written.data_shares = Some(data_shares).filter(|&k| k > 1 || cfg.data_shares.is_some());
    flava_vit::limits::set(cfg.limits);
    let out = cfg.out.clone();
    let scratch = if rank0 { None } else { Some(Scratch::new(rank)?) };
    // Rank 0's answer (a previous run in the way, a resume that changes options) is every rank's.
    let prepared = if rank0 {
        prepare_out_dir(&cfg_written, observer).map_err(|e| format!("{e:#}"))
    } else {
        Ok(())
    };
    let prepared: Result<(), String> = broadcast_json(group.get(), &prepared)?;
    prepared.map_err(|e| anyhow::anyhow!("{e}"))?;
    let run_dir = RunDir::new(&out);
    agree_on_sgemm(group.get(), cfg.resume, &run_dir)?;
    // Hub ids in `init` / `codebook` become their local snapshots (config.toml keeps the ids);
    // rank 0 first, so the ranks of one machine do not download into one cache at once.
    let mut resolved = cfg_written.clone();
    for turn in [true, false] {
        if rank0 == turn {
            for (flag, p) in [("--init", &mut resolved.init), ("--codebook", &mut resolved.codebook)] {
                if let Some(p) = p {
                    *p = crate::hub::resolve(p).context(flag)?;
                }
            }
        }
        if world > 1 {
            group.get().all_gather(&[])?;
        }
    }
    run_prepared(
        &resolved,
        group,
        scratch.as_ref().map(Scratch::path),
        &run_dir,
        observer,
    )
}

/// The file in the run directory naming the library the run's CPU products use (`FLAVA_BLAS`).
const SGEMM_FILE: &str = "sgemm.txt";

/// One sgemm library for every process of the run: rank 0's choice (the one recorded in the run
/// directory when resuming, else its `auto` probe's) on every rank, recorded for later resumes.
/// `auto` times the libraries in each process, and two within the timing noise of each other can
/// be chosen differently from one process to the next; the library changes the last bits of the
/// products, so neither the ranks nor a resume would match bit for bit. An explicit `FLAVA_BLAS`
/// (a path or `off`, the same on every rank) wins, and is recorded for the resumes.
fn agree_on_sgemm(group: &dyn ProcessGroup, resume: bool, run_dir: &RunDir) -> anyhow::Result<()> {
    use flava_vit::kernels::blas::{gemm_backend, set_gemm_backend, GemmBackend};
    let path = run_dir.join(SGEMM_FILE);
    let setting = std::env::var("FLAVA_BLAS").unwrap_or_default();
    if !matches!(setting.trim(), "" | "auto") {
        if group.rank() == 0 {
            write_sgemm(&path, &gemm_backend().setting())?;
        }
        return Ok(());
    }
    let chosen = if group.rank() == 0 {
        if let Some(recorded) = recorded_sgemm(&path).filter(|_| resume) {
            set_gemm_backend(GemmBackend::from_setting(Some(&recorded)));
        }
        let chosen = gemm_backend().setting();
        write_sgemm(&path, &chosen)?;
        chosen
    } else {
        String::new()
    };
    let chosen: String = broadcast_json(group, &chosen)?;
    if group.rank() != 0 {
        set_gemm_backend(GemmBackend::from_setting(Some(&chosen)));
    }
    if gemm_backend().setting() != chosen {
        log::warn!(
            "this process multiplies with {} but the run with {chosen} (chosen before the run started): results will differ in the last bits",
            gemm_backend().setting()
        );
    }
    Ok(())
}

/// Longest `sgemm.txt` read back: the file holds `off`, a path, or a path and the kinds of
/// product it runs (`path@weight-gradient,per-head`), so anything longer is damage.
const SGEMM_FILE_MAX: u64 = 4096;

/// The `FLAVA_BLAS` setting an earlier run recorded in `path` (its first line), or `None` when
/// there is none: no file (a run from before the record), an empty one, or a damaged one (longer
/// than [`SGEMM_FILE_MAX`] or not UTF-8), which is logged and then ignored. Reads at most
/// `SGEMM_FILE_MAX + 1` bytes whatever the file's size.
fn recorded_sgemm(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(SGEMM_FILE_MAX + 1).read_to_end(&mut bytes));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("{}: {e}; the sgemm library is chosen again", path.display());
            return None;
        }
        Ok(_) => {}
    }
    if bytes.len() as u64 > SGEMM_FILE_MAX {
        log::warn!(
            "{}: longer than {SGEMM_FILE_MAX} bytes, not a record of this program's; the sgemm library is chosen again",
            path.display()
        );
        return None;
    }
    let Ok(text) = String::from_utf8(bytes) else {
        log::warn!("{}: not UTF-8 text; the sgemm library is chosen again", path.display());
        return None;
    };
    let first = text.lines().next().unwrap_or("").trim();
    (!first.is_empty()).then(|| first.to_string())
}

/// Records the run's sgemm setting in `path`, atomically (a crash leaves the old record or the new).
fn write_sgemm(path: &Path, setting: &str) -> anyhow::Result<()> {
    flava_vit::atomic::write_file(path, format!("{setting}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Rank 0's part before the run: refuses or clears a previous run, recovers interrupted
/// writes, checks a resumed configuration and writes `config.toml`.
fn prepare_out_dir(cfg: &PretrainConfig, observer: &mut dyn Observer) -> anyhow::Result<()> {
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
    Ok(())
}

/// The run once its directory is ready: `scratch` is where a rank other than 0 keeps what rank
/// 0 shares with it.
fn run_prepared(
    cfg: &PretrainConfig,
    group: &Group,
    scratch: Option<&Path>,
    run_dir: &RunDir,
    observer: &mut dyn Observer,
) -> anyhow::Result<RunSummary> {
    let (rank, world) = (group.get().rank(), group.get().world());
    let rank0 = rank == 0;
    let out = cfg.out.clone();
    let data_shares = cfg.data_shares.unwrap_or(world);

    // Data parallelism: the first of `devices` is the main one (optimizer, checkpoints).
    let dp_devices: Vec<Device> = cfg
        .devices
        .iter()
        .map(|d| crate::pick_device(d))
        .collect::<anyhow::Result<_>>()?;
    let device = match dp_devices.first() {
        Some(d) if dp_devices.len() > 1 => d.clone(),
        // The ranks of one machine each take their own GPU (`cuda` -> `cuda:LOCAL_RANK`).
        _ if world > 1 => crate::pick_device(&rank_device(&cfg.device, local_rank()))?,
        _ => crate::pick_device(&cfg.device)?,
    };
    device.seed(cfg.seed);
    let ad = device.clone().autodiff();

    // Rank 0 prepares the tokenizer and codebook (training them if needed); the other ranks
    // receive its files and load those.
    let mut local = cfg.clone();
    if world > 1 {
        let tok = if rank0 {
            prepare_tokenizer(cfg, observer).map(|(_, t)| vec![t])
        } else {
            Ok(vec![])
        };
        let tok = share_files(group.get(), tok, &scratch.unwrap_or(&out).join("tokenizer"))?;
        if !rank0 {
            local.tokenizer = tok.into_iter().next();
        }
    }
    let cfg = &local;
    let (tokenizer, tokenizer_path) = prepare_tokenizer(cfg, observer)?;
    let preset_cfg = match &cfg.init {
        Some(dir) => read_config(dir)?,
        None => FlavaConfig::preset(&cfg.preset)?,
    };
    let image_size = preset_cfg.image_config.image_size as u32;
    let grid = image_size as usize / preset_cfg.image_config.patch_size;
    let codebook_side = 8 * grid as u32;
    let mut local = cfg.clone();
    if world > 1 {
        let files = if rank0 {
            prepare_codebook(cfg, codebook_side, &device, observer).and_then(|(_, _, dir)| files_in(&dir))
        } else {
            Ok(vec![])
        };
        let got = share_files(group.get(), files, &scratch.unwrap_or(&out).join("codebook"))?;
        if !rank0 {
            local.codebook = got.first().and_then(|p| p.parent()).map(Path::to_path_buf);
        }
    }
    let cfg = &local;
    let (codebook, cb_cfg, codebook_dir) = prepare_codebook(cfg, codebook_side, &device, observer)?;
    let mc = model_config(cfg, &tokenizer, &cb_cfg)?;
    if world > 1 {
        observer.on_message(&format!(
            "distributed: {world} processes, global batch {} in {data_shares} data shares ({} samples per process per step)",
            cfg.batch_size,
            cfg.batch_size / world
        ));
    }
    if dp_devices.len() > 1 {
        observer.on_message(&format!(
            "data parallel over {} devices: {} (batch {} = {} per device per micro-batch)",
            dp_devices.len(),
            cfg.devices.join(", "),
            cfg.batch_size,
            cfg.batch_size / (world * cfg.accumulate * dp_devices.len())
        ));
    }

    // Seeded here, after the dVAE (which seeds and draws on its own), so the initial weights
    // depend on the seed alone. Rank 0 draws first (ranks that are threads of one process share
    // the generator), and every rank then takes rank 0's weights.
    let mut model = None;
    for turn in [true, false] {
        if rank0 == turn {
            model = Some(match &cfg.init {
                Some(dir) => {
                    let l = load_pretraining(dir, true, &ad)
                        .with_context(|| format!("loading --init {}", dir.display()))?;
                    observer.on_message(&format!("init from {}: {}", dir.display(), l.report));
                    l.model
                }
                None => {
                    // Drawn on the CPU whatever the device (as PyTorch initialises before
                    // `.to(device)`), so the initial weights depend on the seed alone.
                    let cpu = Device::flex();
                    cpu.seed(cfg.seed);
                    let m = FlavaForPretraining::new(&mc, &cpu.autodiff());
                    materialize(&m);
                    m.fork(&ad)
                }
            });
            model.as_ref().map(materialize);
        }
        if world > 1 {
            group.get().all_gather(&[])?;
        }
    }
    let model = broadcast_module(group.get(), model.context("no model was built")?, 0)?;
    let strategy = if world > 1 {
        Strategy::Distributed {
            group: group.clone(),
            devices: if dp_devices.len() > 1 {
                dp_devices.clone()
            } else {
                vec![device.clone()]
            },
            accumulate: cfg.accumulate,
        }
    } else if dp_devices.len() > 1 {
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
        // The newest checkpoint that verifies and loads; a damaged one falls back to the one
        // before. Rank 0 chooses; the others load a copy of the same checkpoint.
        let resumed = if rank0 {
            run_dir.resume(
                |dir, st: TrainState| {
                    trainer.load_records(dir, st.counters)?;
                    Ok(st)
                },
                observer,
            )?
        } else {
            None
        };
        let chosen = resumed.as_ref().map(|r| (r.step, r.dir.clone()));
        if let Some(r) = resumed {
            state = r.value;
            observer.on_message(&format!(
                "resumed from {} (step {})",
                r.dir.display(),
                state.counters.step
            ));
        }
        if world > 1 {
            let step: Option<usize> = broadcast_json(group.get(), &chosen.as_ref().map(|c| c.0))?;
            if let Some(step) = step {
                let files = match &chosen {
                    Some((_, dir)) => files_in(dir),
                    None => Ok(vec![]),
                };
                let got = share_files(group.get(), files, &scratch.unwrap_or(&out).join("resume"))?;
                if !rank0 {
                    let dir = got
                        .first()
                        .and_then(|p| p.parent())
                        .context("rank 0 sent an empty checkpoint")?;
                    state = RunDir::verify(dir, step)?;
                    trainer.load_records(dir, state.counters)?;
                }
            }
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
    if matches!(
        device.clone().without_autodiff().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    ) {
        // Which library the CPU kernels multiply with (FLAVA_BLAS; chosen by a probe at first use).
        observer.on_message(flava_vit::kernels::blas::gemm_backend().describe());
    }

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

    // Rank 0 alone writes into the run directory.
    let mut metrics = if rank0 {
        Some(run_dir.metrics(state.counters.step)?)
    } else {
        None
    };
    let metrics_path = run_dir.join("metrics.jsonl");

    let phases = cfg.phases()?;
    let total = cfg.steps;
    let stop_at = cfg.stop_after.map_or(total, |n| (state.counters.step + n).min(total));
    // Collective times are per step from here on (not the start's broadcasts and waits).
    group.take_times();
    observer.on_train_start("flava", trainer.step_count(), total);
    let started = Instant::now();
    let save = |trainer: &Trainer<Pretraining>, state: &TrainState, observer: &mut dyn Observer| {
        if rank0 {
            run_dir.save_trainer(trainer, state, cfg.keep_checkpoints, observer)
        } else {
            Ok(run_dir.checkpoint_dir(trainer.step_count()))
        }
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
        // This process's data shares: all of them alone, a contiguous run of them as a rank.
        let mut first = Some(srcs);
        let mut loader = DataLoader::with_shares(
            Shares::of_rank(data_shares, rank, world)?,
            |_| match first.take() {
                Some(s) => Ok(s),
                None => sources(cfg, phase.kind)
                    .map(|(s, _)| s)
                    .map_err(|e| LoaderError::Shares(format!("{e:#}"))),
            },
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
            let next = loader.next_batch();
            // Every rank's data of this step: all go on, or all stop with the failing ranks' errors.
            let (next, mixer, per_source) = if world > 1 {
                let mine = match &next {
                    Ok(lb) => RankData {
                        error: None,
                        mixer: Some(lb.state_after.clone()),
                        per_source: lb.per_source.clone(),
                    },
                    Err(e) => RankData {
                        error: Some(e.to_string()),
                        mixer: None,
                        per_source: BTreeMap::new(),
                    },
                };
                let all = all_gather_json(group.get(), &mine)?;
                let errors: Vec<String> = all
                    .iter()
                    .enumerate()
                    .filter_map(|(r, d)| d.error.as_ref().map(|e| format!("rank {r}: {e}")))
                    .collect();
                if errors.is_empty() {
                    let states: Vec<MixerState> = all.iter().filter_map(|d| d.mixer.clone()).collect();
                    let per_source = all
                        .iter()
                        .fold(BTreeMap::new(), |acc, d| merge_stats(&acc, &d.per_source));
                    (
                        next.map_err(|e| e.to_string()),
                        Some(MixerState::merge(&states)?),
                        per_source,
                    )
                } else {
                    (Err(errors.join("; ")), None, BTreeMap::new())
                }
            } else {
                match next {
                    Ok(lb) => {
                        let (m, p) = (lb.state_after.clone(), lb.per_source.clone());
                        (Ok(lb), Some(m), p)
                    }
                    Err(e) => (Err(e.to_string()), None, BTreeMap::new()),
                }
            };
            let lb = match next {
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
            state.mixer = mixer;
            state.data = merge_stats(&data_base, &per_source);
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
            // Every rank's rows count.
            m.samples = host.batch_size * world;
            state.samples += m.samples as u64;
            // The step's time includes waiting for its batch.
            m.step_time_s = t0.elapsed().as_secs_f64();
            state.train_seconds += m.step_time_s;
            let mut line = m.to_json();
            line["skipped"] = json!(state.data.values().map(StreamStats::total_skipped).sum::<u64>());
            if world > 1 {
                // This step's time in collectives (rank 0's, waiting for slower ranks included).
                let t = group.take_times();
                line["comm_all_reduce_s"] = json!(t.all_reduce_s);
                line["comm_all_gather_s"] = json!(t.all_gather_s);
            }
            if let Some(metrics) = metrics.as_mut() {
                metrics.write(&line)?;
            }
            let step = trainer.step_count();
            if cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every) && step < total {
                save(&trainer, &state, observer)?;
            }
        }
        drop(loader);
        phase_start = phase_end;
    }
    match metrics.as_mut() {
        Some(metrics) => run_dir.finish(&trainer, &mut state, cfg.keep_checkpoints, metrics, observer)?,
        None => {
            observer.on_train_end();
            state.set_counters(trainer.counters);
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let counters = state.counters;
    if counters.step < total || !rank0 {
        if counters.step < total {
            observer.on_message(&format!(
                "stopped after step {} of {total} (--stop-after); continue with --resume",
                counters.step
            ));
        }
        // The model directory, evaluation and report are rank 0's.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `sgemm.txt` is read back on resume; damaged or hostile copies are ignored, read within a
    /// bounded size, and never stop the run.
    #[test]
    fn recorded_sgemm_reads_one_bounded_line() {
        let dir = std::env::temp_dir().join(format!("flava-sgemm-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SGEMM_FILE);
        assert_eq!(recorded_sgemm(&path), None, "no file: nothing recorded");

        write_sgemm(&path, "/usr/lib/x86_64-linux-gnu/libopenblas.so.0").unwrap();
        assert_eq!(
            recorded_sgemm(&path).as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
        );
        assert!(
            !flava_vit::atomic::tmp_path(&path).exists(),
            "the temporary file is renamed away"
        );
        std::fs::write(&path, "  off  \r\nsomething else\n").unwrap();
        assert_eq!(recorded_sgemm(&path).as_deref(), Some("off"), "the first line, trimmed");

        for (what, bytes) in [
            ("empty", Vec::new()),
            ("blank first line", b"   \nlibfoo.so\n".to_vec()),
            ("not UTF-8", vec![0xff, 0xfe, 0x00, 0x80, b'\n']),
            ("one byte too long", vec![b'a'; SGEMM_FILE_MAX as usize + 1]),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(recorded_sgemm(&path), None, "{what}");
        }
        std::fs::write(&path, vec![b'a'; SGEMM_FILE_MAX as usize]).unwrap();
        assert_eq!(
            recorded_sgemm(&path).map(|s| s.len()),
            Some(SGEMM_FILE_MAX as usize),
            "4 KiB is read"
        );

        // A 64 GiB sparse file (a lying record): refused after reading 4 KiB + 1 byte of it.
        let huge = std::fs::File::create(&path).unwrap();
        huge.set_len(64 << 30).unwrap();
        drop(huge);
        let start = Instant::now();
        assert_eq!(recorded_sgemm(&path), None);
        assert!(start.elapsed().as_secs() < 10, "read in bounded time");

        // A directory in its place: an error that is logged, not a failure.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert_eq!(recorded_sgemm(&path), None);
        // And the run cannot record over it: a clear error naming the file.
        let err = write_sgemm(&path, "off").unwrap_err().to_string();
        assert!(err.contains(SGEMM_FILE), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
