//! Training a dVAE image tokenizer on the workspace's [`Trainer`]: images from any `flava-data`
//! source, the losses of `flava_dvae::dvae::Dvae::losses`, the shared optimizer (warmup, cosine
//! to `min_lr_ratio`), and a [`RunDir`]: `checkpoints/step-N/` written whole, resume from the
//! newest readable one, `metrics.jsonl` cut back to the resumed step.
//!
//! Run directory: `dvae_config.json`, `checkpoints/`, `metrics.jsonl`, `codebook/` (the encoder
//! in the HF codebook layout), `decoder.safetensors`, and `eval.json` when evaluated.

use std::cell::Cell;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use flava_data::sources::{Record, Source};
use flava_data::stream::{decode, SampleStream, StreamPosition, StreamStats};
use flava_data::task::Task;
use flava_data::transforms::{eval_transform, train_transform, TrainTransformConfig};
use flava_dvae::dvae::{
    batch_tensor, noise_scale, perplexity, progress, psnr, tau_at, uniform_noise, unmap_pixel, Dvae, DvaeTrainConfig,
    LossSettings,
};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::observer::Observer;
use crate::optim::OptimizerConfig;
use crate::run_dir::RunDir;
use crate::trainer::{Computed, Counters, Objective, Trainer, TrainerConfig};

/// Files a dVAE run leaves in its directory (a new run refuses to start over them without
/// resume or force; `--force` removes them).
pub const RUN_FILES: [&str; 9] = [
    "checkpoints",
    "codebook",
    "codebook.tmp",
    "metrics.jsonl",
    "decoder.safetensors",
    "eval.json",
    "dvae_config.json",
    // Written by earlier versions (one `checkpoint/` directory).
    "checkpoint",
    "checkpoint.tmp",
];

/// The first file of a previous dVAE run in `out`, if any.
pub fn previous_run(out: &Path) -> Option<&'static str> {
    RUN_FILES[..7].iter().copied().find(|f| out.join(f).exists())
}

/// Removes the files of a previous dVAE run in `out` (for `--force`).
pub fn remove_previous(out: &Path) -> anyhow::Result<()> {
    for f in RUN_FILES {
        let p = out.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Saved training progress besides the model and optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DvaeState {
    /// Updates done and the non-finite guard's counts.
    #[serde(flatten)]
    pub counters: Counters,
    /// Data position.
    pub data: StreamPosition,
    /// Mean training image so far ([3·H·W] in [0, 1]).
    pub mean_image: Vec<f64>,
    /// Images averaged.
    pub mean_count: u64,
    /// Seconds of training so far (over resumed runs too): the time limit counts them.
    #[serde(default)]
    pub train_seconds: f64,
}

impl crate::run_dir::RunState for DvaeState {
    fn set_counters(&mut self, counters: crate::trainer::Counters) {
        self.counters = counters;
    }
}

/// One dVAE step's input: mapped pixels [B, 3, S, S] on the autodiff device.
#[derive(Debug, Clone)]
pub struct DvaeBatch {
    /// The images.
    pub x: Tensor<4>,
}

/// The dVAE objective: the losses, annealed by training progress (steps or time).
pub struct DvaeObjective {
    cfg: DvaeTrainConfig,
    started: Instant,
    base_seconds: f64,
    /// The progress of the current step, read once so the schedule and the losses agree.
    progress: Cell<Option<(usize, f64)>>,
}

impl DvaeObjective {
    /// The objective of `cfg`, `base_seconds` of training already done (a resumed run).
    pub fn new(cfg: &DvaeTrainConfig, base_seconds: f64) -> Self {
        Self {
            cfg: cfg.clone(),
            started: Instant::now(),
            base_seconds,
            progress: Cell::new(None),
        }
    }

    /// Seconds of training, resumed runs included.
    pub fn seconds(&self) -> f64 {
        self.base_seconds + self.started.elapsed().as_secs_f64()
    }

    fn progress_at(&self, step: usize) -> f64 {
        if let Some((s, p)) = self.progress.get() {
            if s == step {
                return p;
            }
        }
        let p = progress(&self.cfg, step, self.seconds());
        self.progress.set(Some((step, p)));
        p
    }
}

impl Objective for DvaeObjective {
    type Model = Dvae;
    type Batch = DvaeBatch;

    fn compute(&mut self, model: &Dvae, batch: &DvaeBatch, step: usize, _total: usize) -> anyhow::Result<Computed> {
        let cfg = &self.cfg;
        let p = self.progress_at(step);
        let tau = tau_at(cfg, p);
        let [b, _, s, _] = batch.x.dims();
        let v = cfg.codebook.vocab_size;
        let u = uniform_noise([b, v, s / 8, s / 8], cfg.seed, step as u64, &batch.x.device());
        let settings = LossSettings {
            tau,
            noise_scale: noise_scale(cfg, p),
            kl_weight: cfg.kl_weight * ((step + 1) as f64 / cfg.kl_warmup.max(1) as f64).min(1.0),
            usage_weight: cfg.usage_weight,
            reconstruction: cfg.reconstruction,
        };
        let l = model.losses(batch.x.clone(), u, &settings);
        let loss = l.total.clone().into_scalar::<f64>();
        let grads = loss
            .is_finite()
            .then(|| GradientsParams::from_grads(l.total.backward(), model));
        let mse = (l.prediction.detach() - l.target.detach())
            .square()
            .mean()
            .into_scalar::<f64>();
        let hard: Vec<i64> = l
            .logits
            .detach()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap_or_default();
        let mut counts = vec![0u64; v];
        hard.iter().for_each(|&c| counts[(c as usize).min(v - 1)] += 1);
        let terms = vec![
            ("reconstruction".to_string(), l.reconstruction.into_scalar::<f64>()),
            ("kl".to_string(), l.kl.into_scalar::<f64>()),
            ("usage_kl".to_string(), l.usage_kl.into_scalar::<f64>()),
            ("psnr".to_string(), psnr(mse)),
            ("perplexity".to_string(), perplexity(&counts)),
            ("tau".to_string(), tau),
        ];
        Ok(Computed { loss, terms, grads })
    }

    fn task(&self, _batch: &DvaeBatch) -> String {
        "dvae".into()
    }

    fn samples(&self, batch: &DvaeBatch) -> usize {
        batch.x.dims()[0]
    }

    fn progress(&self, step: usize, _total: usize) -> Option<f64> {
        Some(self.progress_at(step))
    }
}

/// The optimizer settings of a dVAE run (no clipping, as DALL-E's recipe).
pub fn optimizer_config(cfg: &DvaeTrainConfig) -> OptimizerConfig {
    OptimizerConfig {
        lr: cfg.lr,
        warmup: cfg.warmup,
        min_lr_ratio: cfg.min_lr_ratio,
        weight_decay: cfg.weight_decay,
        betas: (0.9, 0.999),
        eps: 1e-8,
        grad_clip: 0.0,
        freeze: vec![],
    }
}

/// Reads `n` images of a stream as mapped codebook pixels ([3·S·S] each); unusable records
/// are counted and skipped.
pub fn read_images(
    stream: &mut SampleStream,
    n: usize,
    cfg: &DvaeTrainConfig,
    step: u64,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let t = TrainTransformConfig {
        image_size: cfg.image_size,
        codebook_size: cfg.image_size,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match stream.next_record()? {
            Record::Sample(raw) => {
                let key = raw.key.clone();
                match decode(raw, Task::Images) {
                    Ok(d) => {
                        stream.count_sample();
                        let Some(img) = d.image else { continue };
                        let two = if cfg.random_crop {
                            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                                cfg.seed ^ step.wrapping_mul(1_000_003) ^ out.len() as u64,
                            );
                            train_transform(&img, &t, &mut rng)
                        } else {
                            eval_transform(&img, cfg.image_size, cfg.image_size)
                        };
                        out.push(two.codebook);
                    }
                    Err((reason, detail)) => stream.count_skip(reason, &key, &detail)?,
                }
            }
            Record::Skipped { reason, key, detail } => stream.count_skip(reason, &key, &detail)?,
        }
    }
    Ok(out)
}

/// What a finished run returns.
#[derive(Debug)]
pub struct TrainedDvae {
    /// The model (autodiff stripped).
    pub model: Dvae,
    /// Final state.
    pub state: DvaeState,
    /// The last update's metrics.
    pub last: Option<crate::observer::StepMetrics>,
    /// Samples read and skipped (by reason) in this invocation.
    pub data: StreamStats,
}

/// Trains on `source` (any image source) into `out` (see the module docs); `resume` continues
/// from the newest readable checkpoint.
pub fn train(
    cfg: &DvaeTrainConfig,
    source: Box<dyn Source>,
    out: &Path,
    resume: bool,
    device: &Device,
    observer: &mut dyn Observer,
) -> anyhow::Result<TrainedDvae> {
    cfg.validate()?;
    let run = RunDir::new(out);
    let config_path = out.join("dvae_config.json");
    if resume {
        if let Ok(text) = std::fs::read_to_string(&config_path) {
            let saved: DvaeTrainConfig =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
            cfg.check_resumable(&saved)?;
        }
    } else if let Some(found) = previous_run(out) {
        anyhow::bail!(
            "{} already holds a dVAE run ({found}); pass --resume to continue it, --force to start over, or choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    run.remove_partial();
    flava_vit::atomic::write_file(&config_path, serde_json::to_string_pretty(cfg)?.as_bytes())?;
    // Same seed, same run: the initial weights come from the seeded device RNG, and the Gumbel
    // noise of each step from (seed, step) on the host (so a resumed run draws the same noise).
    device.seed(cfg.seed);
    let ad = device.clone().autodiff();
    let s = cfg.image_size as usize;
    let mut state = DvaeState {
        counters: Counters::default(),
        data: StreamPosition::default(),
        mean_image: vec![0.0; 3 * s * s],
        mean_count: 0,
        train_seconds: 0.0,
    };
    let mut trainer = Trainer::new(
        Dvae::new(cfg, &ad),
        DvaeObjective::new(cfg, 0.0),
        TrainerConfig {
            optimizer: optimizer_config(cfg),
            steps: cfg.steps,
            max_nonfinite: 1,
        },
    );
    let mut stream = SampleStream::new(source);
    if resume {
        let resumed = run.resume(
            |dir, st: DvaeState| {
                if st.mean_image.len() != 3 * s * s {
                    anyhow::bail!("{}: the mean image does not match image_size {s}", dir.display());
                }
                trainer.load_records(dir, st.counters)?;
                Ok(st)
            },
            observer,
        )?;
        if let Some(r) = resumed {
            stream.seek(r.value.data)?;
            observer.on_message(&format!("resumed dVAE training at step {}", r.step));
            state = r.value;
            trainer.objective = DvaeObjective::new(cfg, state.train_seconds);
        }
    }
    let mut metrics = run.metrics(state.counters.step)?;
    let keep = 2;
    let save = |trainer: &Trainer<DvaeObjective>, state: &DvaeState, observer: &mut dyn Observer| {
        run.save_trainer(trainer, state, keep, observer)
    };
    observer.on_train_start("dvae", trainer.step_count(), cfg.steps);
    let mut last = None;
    while trainer.step_count() < cfg.steps {
        if cfg.time_limit_s.is_some_and(|l| trainer.objective.seconds() >= l) {
            observer.on_message(&format!("time limit reached after {} steps", trainer.step_count()));
            break;
        }
        let t0 = Instant::now();
        let imgs = read_images(&mut stream, cfg.batch_size, cfg, trainer.step_count() as u64)?;
        for img in &imgs {
            state.mean_count += 1;
            let k = state.mean_count as f64;
            for (m, &p) in state.mean_image.iter_mut().zip(img) {
                *m += (unmap_pixel(p as f64) - *m) / k;
            }
        }
        let batch = DvaeBatch {
            x: batch_tensor(&imgs, s, &ad),
        };
        let mut m = trainer.step(&batch, observer)?;
        state.data = stream.position();
        state.train_seconds = trainer.objective.seconds();
        if !m.updated {
            observer.on_train_end();
            let dir = save(&trainer, &state, observer)?;
            anyhow::bail!(
                "non-finite dVAE loss at step {}; saved the last good state to {}",
                m.step,
                dir.display()
            );
        }
        m.step_time_s = t0.elapsed().as_secs_f64();
        metrics.write(&m.to_json())?;
        let step = trainer.step_count();
        last = Some(m);
        if step.is_multiple_of(cfg.checkpoint_every.max(1)) {
            save(&trainer, &state, observer)?;
        }
    }
    run.finish(&trainer, &mut state, keep, &mut metrics, observer)?;
    let valid = trainer.model().valid();
    let codebook_dir = flava_vit::atomic::AtomicDir::new(out.join("codebook"))?;
    flava_dvae::save_codebook(&valid.encoder, &cfg.codebook, codebook_dir.path())?;
    codebook_dir.commit()?;
    let dec = flava_vit::weights::module_state_dict(&valid.decoder, "", &[]);
    dec.save_safetensors(out.join("decoder.safetensors"))?;
    Ok(TrainedDvae {
        model: valid,
        state,
        last,
        data: stream.stats.clone(),
    })
}

/// Loads a trained dVAE (`dvae_config.json` and the newest readable checkpoint) for
/// reconstruction.
pub fn load_trained(dir: &Path, device: &Device) -> anyhow::Result<(Dvae, DvaeTrainConfig)> {
    let p = dir.join("dvae_config.json");
    let cfg: DvaeTrainConfig =
        serde_json::from_str(&std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("parsing {}", p.display()))?;
    let fresh = Dvae::new(&cfg, device);
    let loaded = RunDir::new(dir).resume(
        |ckpt, _: DvaeState| {
            fresh
                .clone()
                .try_load_file(ckpt.join("model"))
                .with_context(|| format!("loading {}", ckpt.join("model").display()))
        },
        &mut crate::observer::Quiet,
    )?;
    let model = loaded
        .with_context(|| format!("{} has no dVAE checkpoint", dir.display()))?
        .value;
    Ok((model, cfg))
}
