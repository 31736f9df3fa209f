//! Training a dVAE of one's own: Gumbel-softmax relaxation with temperature annealing, KL to the
//! uniform prior with weight annealing, an L2 or logit-Laplace reconstruction loss, AdamW with
//! warmup and cosine decay, checkpoints and resume, and the metrics that tell whether a codebook
//! is good: reconstruction PSNR against predicting the mean image, perplexity and codes used.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use flava_data::sources::{Record, Source};
use flava_data::stream::{decode, SampleStream, StreamPosition, Task};
use flava_data::transforms::{eval_transform, train_transform, TrainTransformConfig};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::save_codebook;
use crate::config::FlavaImageCodebookConfig;
use crate::decoder::{Decoder, DecoderConfig};
use crate::encoder::ImageCodebook;

/// The reconstruction loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reconstruction {
    /// Mean squared error of `sigmoid(out[:, :3])` against the pixels in [0, 1].
    L2,
    /// DALL-E's logit-Laplace likelihood (6 output channels: μ and ln b).
    LogitLaplace,
}

/// dVAE training settings (a TOML/JSON file may give any of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DvaeTrainConfig {
    /// The encoder (becomes the FLAVA codebook).
    pub codebook: FlavaImageCodebookConfig,
    /// The decoder (its `vocab_size` follows the codebook's).
    pub decoder: DecoderConfig,
    /// Image side (8× the token grid side).
    pub image_size: u32,
    /// Images per step.
    pub batch_size: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Stop early after this many seconds of training (the run is saved as finished).
    pub time_limit_s: Option<f64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gumbel-softmax temperature at the start.
    pub tau_start: f64,
    /// … and at the end (exponential annealing).
    pub tau_end: f64,
    /// Weight of the KL to the uniform prior, reached after `kl_warmup` steps.
    pub kl_weight: f64,
    /// Steps of linear KL-weight warmup.
    pub kl_warmup: usize,
    /// Weight of the code-usage term: the KL from the batch's average code distribution to the
    /// uniform one (`ln V − H(mean q)`). It keeps all codes in use without pulling each
    /// position's distribution towards uniform, as the per-position KL does.
    pub usage_weight: f64,
    /// Share of training over which the Gumbel noise grows from 0 to full scale. Early steps
    /// then train a deterministic softmax bottleneck, whose gradients are far less noisy; by
    /// the end the relaxation is the plain Gumbel-softmax. 0 = full noise from the start.
    pub noise_warmup: f64,
    /// Reconstruction loss.
    pub reconstruction: Reconstruction,
    /// Random crops (scale 0.9–1) instead of plain resizing.
    pub random_crop: bool,
    /// Checkpoint every N steps.
    pub checkpoint_every: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for DvaeTrainConfig {
    /// The best of the settings tried for a 5-minute run on 2 cores at 64 px (see the README).
    fn default() -> Self {
        Self {
            codebook: FlavaImageCodebookConfig {
                hidden_size: 32,
                vocab_size: 128,
                num_blocks_per_group: 1,
                ..Default::default()
            },
            decoder: DecoderConfig {
                vocab_size: 128,
                n_init: 32,
                hidden_size: 32,
                num_blocks_per_group: 1,
                output_channels: 3,
            },
            image_size: 64,
            batch_size: 8,
            steps: 1200,
            time_limit_s: None,
            lr: 3e-3,
            warmup: 20,
            weight_decay: 0.0,
            tau_start: 1.0,
            tau_end: 0.25,
            kl_weight: 0.0,
            kl_warmup: 100,
            usage_weight: 0.005,
            noise_warmup: 0.5,
            reconstruction: Reconstruction::L2,
            random_crop: false,
            checkpoint_every: 200,
            seed: 0,
        }
    }
}

impl DvaeTrainConfig {
    /// Checks values that would fail later, or train nonsense, with a clear message.
    pub fn validate(&self) -> Result<(), String> {
        self.codebook.validate()?;
        let positive = [
            ("lr", self.lr),
            ("tau_start", self.tau_start),
            ("tau_end", self.tau_end),
        ];
        if let Some((name, v)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(format!("dVAE {name} must be a positive number, got {v}"));
        }
        let non_negative = [
            ("weight_decay", self.weight_decay),
            ("kl_weight", self.kl_weight),
            ("usage_weight", self.usage_weight),
            ("noise_warmup", self.noise_warmup),
        ];
        if let Some((name, v)) = non_negative.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            return Err(format!("dVAE {name} must be ≥ 0, got {v}"));
        }
        if self.batch_size == 0 || self.steps == 0 || self.checkpoint_every == 0 {
            return Err("dVAE batch_size, steps and checkpoint_every must be at least 1".into());
        }
        if self.image_size < 8 || !self.image_size.is_multiple_of(8) {
            return Err(format!(
                "dVAE image_size must be a multiple of 8, got {}",
                self.image_size
            ));
        }
        flava_vit::limits::current().check_dim("dVAE image_size", self.image_size as u64)?;
        if self.time_limit_s.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
            return Err("dVAE time_limit_s must be a positive number of seconds".into());
        }
        Ok(())
    }

    /// `Err` naming the fields that a resumed run may not change (the model, the data
    /// transform, the losses); steps, the time limit and checkpointing may change.
    pub fn check_resumable(&self, saved: &DvaeTrainConfig) -> Result<(), String> {
        let norm = |c: &DvaeTrainConfig| DvaeTrainConfig {
            steps: 0,
            time_limit_s: None,
            checkpoint_every: 0,
            ..c.clone()
        };
        if norm(self) == norm(saved) {
            return Ok(());
        }
        let (a, b) = (
            serde_json::to_value(norm(saved)).expect("json"),
            serde_json::to_value(norm(self)).expect("json"),
        );
        let changed: Vec<String> = a
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        Err(format!(
            "--resume: the run was started with other settings ({}); resume with the same settings, or start a new run",
            changed.join(", ")
        ))
    }

    /// The decoder configuration with the codebook's vocabulary and the loss's channels.
    pub fn decoder_config(&self) -> DecoderConfig {
        DecoderConfig {
            vocab_size: self.codebook.vocab_size,
            output_channels: match self.reconstruction {
                Reconstruction::L2 => 3,
                Reconstruction::LogitLaplace => 6,
            },
            ..self.decoder.clone()
        }
    }
}

/// Encoder and decoder.
#[derive(Module, Debug)]
pub struct Dvae {
    /// The encoder.
    pub encoder: ImageCodebook,
    /// The decoder.
    pub decoder: Decoder,
}

impl Dvae {
    /// A randomly initialised dVAE.
    pub fn new(cfg: &DvaeTrainConfig, device: &Device) -> Self {
        Self {
            encoder: ImageCodebook::new(&cfg.codebook, device),
            decoder: Decoder::new(&cfg.decoder_config(), device),
        }
    }

    /// Reconstructs images from their hard tokens: [B, 3, H, W] mapped pixels → [B, 3, H, W] in
    /// [0, 1].
    pub fn reconstruct(&self, x: Tensor<4>) -> Tensor<4> {
        let logits = self.encoder.forward(x);
        let [b, v, h, w] = logits.dims();
        let idx = logits.argmax(1).expand([b, v, h, w]);
        let codes = Tensor::<1, Int>::arange(0..v as i64, &idx.device())
            .reshape([1, v, 1, 1])
            .expand([b, v, h, w]);
        let one_hot = idx.equal(codes).float();
        let out = self.decoder.forward(one_hot);
        sigmoid(out.slice(s![.., 0..3, .., ..]))
    }
}

/// One step's numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DvaeMetrics {
    /// Step (1-based).
    pub step: usize,
    /// Total loss.
    pub loss: f64,
    /// Reconstruction term.
    pub reconstruction: f64,
    /// KL to the uniform prior (nats per position).
    pub kl: f64,
    /// KL from the batch's average code distribution to uniform (nats; the usage term).
    #[serde(default)]
    pub usage_kl: f64,
    /// PSNR of the relaxed reconstruction on the batch (dB).
    pub psnr: f64,
    /// Perplexity of the batch's hard code usage.
    pub perplexity: f64,
    /// Temperature.
    pub tau: f64,
    /// Learning rate.
    pub lr: f64,
    /// Seconds this step took.
    pub step_time_s: f64,
}

/// Held-out quality.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DvaeEval {
    /// PSNR of the hard-token reconstruction (dB).
    pub psnr: f64,
    /// PSNR of predicting the training set's mean image (dB).
    pub baseline_psnr: f64,
    /// Share of the vocabulary used on the held-out images.
    pub codes_used: f64,
    /// Perplexity of the held-out code usage.
    pub perplexity: f64,
    /// Images evaluated.
    pub images: usize,
}

/// Saved training progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DvaeState {
    /// Steps done.
    pub step: usize,
    /// Data position.
    pub data: StreamPosition,
    /// Mean training image so far ([3·H·W] in [0, 1]) and how many images it averages.
    pub mean_image: Vec<f64>,
    /// Images averaged.
    pub mean_count: u64,
    /// Seconds of training so far (over resumed runs too): the time limit counts them.
    #[serde(default)]
    pub train_seconds: f64,
}

fn psnr(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

fn perplexity(counts: &[u64]) -> f64 {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// How far training is, in [0, 1]: the share of `steps` done or, with a time limit, the share
/// of the time spent, whichever is larger. The schedules follow it, so that a run cut short by
/// its time limit still ends annealed (low temperature, decayed learning rate): the hard-token
/// codebook it saves is what its decoder was trained for.
fn progress(cfg: &DvaeTrainConfig, step: usize, seconds: f64) -> f64 {
    let by_steps = step as f64 / cfg.steps.max(1) as f64;
    let by_time = cfg.time_limit_s.map_or(0.0, |l| seconds / l.max(1e-9));
    by_steps.max(by_time).min(1.0)
}

fn lr_at(cfg: &DvaeTrainConfig, step: usize, progress: f64) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// The usage term: KL from the average code distribution over the batch and grid to the
/// uniform one, `ln V − H(mean q)`, for encoder logits [B, V, h, w]; returns [1]. It is 0 when
/// codes are used equally often, `ln V` when every position picks the same code.
pub fn usage_kl(logits: Tensor<4>) -> Tensor<1> {
    let v = logits.dims()[1];
    let q = softmax(logits, 1);
    let q_mean = q.permute([1, 0, 2, 3]).reshape([v as i64, -1]).mean_dim(1).reshape([v]);
    (q_mean.clone() * (q_mean.clamp_min(1e-12).log() + (v as f64).ln())).sum()
}

/// Scale of the Gumbel noise: rises linearly from 0 to 1 over the first `noise_warmup` of
/// training.
fn noise_scale(cfg: &DvaeTrainConfig, progress: f64) -> f64 {
    if cfg.noise_warmup <= 0.0 {
        1.0
    } else {
        (progress / cfg.noise_warmup).min(1.0)
    }
}

fn tau_at(cfg: &DvaeTrainConfig, progress: f64) -> f64 {
    cfg.tau_start * (cfg.tau_end / cfg.tau_start).powf(progress)
}

/// Reads `n` images of a stream as mapped codebook pixels ([3·S·S] each).
pub fn read_images(
    stream: &mut SampleStream,
    n: usize,
    cfg: &DvaeTrainConfig,
    step: u64,
) -> Result<Vec<Vec<f32>>, String> {
    let t = TrainTransformConfig {
        image_size: cfg.image_size,
        codebook_size: cfg.image_size,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match stream.next_record().map_err(|e| e.to_string())? {
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
                    Err((reason, detail)) => stream.count_skip(reason, &key, &detail).map_err(|e| e.to_string())?,
                }
            }
            Record::Skipped { reason, key, detail } => {
                stream.count_skip(reason, &key, &detail).map_err(|e| e.to_string())?
            }
        }
    }
    Ok(out)
}

fn batch_tensor(imgs: &[Vec<f32>], s: usize, device: &Device) -> Tensor<4> {
    let flat: Vec<f32> = imgs.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [imgs.len(), 3, s, s]), device)
}

/// Evaluates hard-token reconstructions of `images` (mapped pixels) against the mean image.
pub fn evaluate(model: &Dvae, images: &[Vec<f32>], mean_image: &[f64], image_size: usize, device: &Device) -> DvaeEval {
    let v = model.encoder.blocks.output.conv.weight.dims()[0];
    let mut counts = vec![0u64; v];
    let (mut se, mut se_base, mut n) = (0f64, 0f64, 0usize);
    for chunk in images.chunks(16) {
        let x = batch_tensor(chunk, image_size, device);
        let target = (x.clone() - 0.1) / 0.8;
        let rec = model.reconstruct(x.clone());
        se += (rec - target.clone()).square().sum().into_scalar::<f64>();
        let t: Vec<i64> = model
            .encoder
            .tokens(x)
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap_or_default();
        t.iter().for_each(|&c| counts[c as usize] += 1);
        let tv: Vec<f32> = target.into_data().convert::<f32>().try_into_vec().unwrap_or_default();
        let plane = mean_image.len();
        se_base += tv
            .iter()
            .enumerate()
            .map(|(i, &p)| (p as f64 - mean_image[i % plane]).powi(2))
            .sum::<f64>();
        n += tv.len();
    }
    let used = counts.iter().filter(|&&c| c > 0).count();
    DvaeEval {
        psnr: psnr(se / n.max(1) as f64),
        baseline_psnr: psnr(se_base / n.max(1) as f64),
        codes_used: used as f64 / v as f64,
        perplexity: perplexity(&counts),
        images: images.len(),
    }
}

/// What a finished run returns.
#[derive(Debug)]
pub struct TrainedDvae {
    /// The model (on the training device, autodiff stripped by `valid()` where needed).
    pub model: Dvae,
    /// Final state.
    pub state: DvaeState,
    /// The last step's metrics.
    pub last: DvaeMetrics,
    /// Samples read and skipped (by reason) in this invocation.
    pub data: flava_data::stream::StreamStats,
}

/// Trains on `source` (any image source) and writes into `out`: `checkpoint/` (model, optimizer,
/// state; resumable with `resume`), `codebook/` (the encoder in the HF codebook layout),
/// `decoder.safetensors`, `dvae_config.json`, `metrics.jsonl`.
pub fn train(
    cfg: &DvaeTrainConfig,
    source: Box<dyn Source>,
    out: &Path,
    resume: bool,
    device: &Device,
    on_step: impl FnMut(&DvaeMetrics),
) -> Result<TrainedDvae, String> {
    train_with_hooks(cfg, source, out, resume, device, on_step, &NoHooks)
}

/// Test hooks of [`train_with_hooks`] (fault injection without production switches).
pub trait TrainHooks {
    /// Called with a checkpoint's temporary directory after its files are written and before
    /// it is moved into place (a test can stop the process here, as a crash would).
    fn before_commit(&self, _step: usize, _tmp_dir: &Path) {}
}

/// No hooks.
pub struct NoHooks;

impl TrainHooks for NoHooks {}

/// Files of a previous run in `out`, if any (a fresh run must not overwrite them).
pub fn previous_run(out: &Path) -> Option<String> {
    [
        "checkpoint",
        "codebook",
        "metrics.jsonl",
        "decoder.safetensors",
        "eval.json",
    ]
    .iter()
    .find(|f| out.join(f).exists())
    .map(|f| f.to_string())
}

/// Uniform noise in (0, 1) of `dims` from `(seed, step)`: the same for a resumed run.
fn uniform_noise(dims: [usize; 4], seed: u64, step: u64, device: &Device) -> Tensor<4> {
    use rand::Rng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xD1CE_5EED);
    rng.set_stream(step);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(1e-10f32..1.0 - 1e-7)).collect();
    Tensor::from_data(TensorData::new(v, dims), device)
}

/// [`train`] with test hooks.
#[allow(clippy::too_many_arguments)]
pub fn train_with_hooks(
    cfg: &DvaeTrainConfig,
    source: Box<dyn Source>,
    out: &Path,
    resume: bool,
    device: &Device,
    mut on_step: impl FnMut(&DvaeMetrics),
    hooks: &dyn TrainHooks,
) -> Result<TrainedDvae, String> {
    let io = |e: std::io::Error| e.to_string();
    cfg.validate()?;
    let ckpt = out.join("checkpoint");
    flava_vit::atomic::recover_dir(&ckpt);
    let config_path = out.join("dvae_config.json");
    if resume {
        if let Ok(text) = std::fs::read_to_string(&config_path) {
            let saved: DvaeTrainConfig =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", config_path.display()))?;
            cfg.check_resumable(&saved)?;
        }
    } else if let Some(found) = previous_run(out) {
        return Err(format!(
            "{} already holds a dVAE run ({found}); pass --resume to continue it, --force to start over, or choose another --out",
            out.display()
        ));
    }
    std::fs::create_dir_all(out).map_err(io)?;
    flava_vit::atomic::write_file(
        &config_path,
        serde_json::to_string_pretty(cfg).expect("json").as_bytes(),
    )
    .map_err(io)?;
    // Same seed, same run: the initial weights come from the seeded device RNG, and the Gumbel
    // noise of each step from (seed, step) on the host (so a resumed run draws the same noise).
    device.seed(cfg.seed);
    let ad = device.clone().autodiff();
    let mut model = Dvae::new(cfg, &ad);
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(cfg.weight_decay as f32)
        .init();
    let s = cfg.image_size as usize;
    let mut stream = SampleStream::new(source);
    let mut state = DvaeState {
        step: 0,
        data: StreamPosition::default(),
        mean_image: vec![0.0; 3 * s * s],
        mean_count: 0,
        train_seconds: 0.0,
    };
    if resume && ckpt.join("state.json").is_file() {
        let st: DvaeState = serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).map_err(io)?)
            .map_err(|e| format!("{}: {e}", ckpt.join("state.json").display()))?;
        if st.mean_image.len() != 3 * s * s {
            return Err(format!(
                "{}: the mean image does not match image_size {s}",
                ckpt.display()
            ));
        }
        model = model
            .try_load_file(ckpt.join("model"))
            .map_err(|e| format!("loading {}: {e}", ckpt.join("model").display()))?;
        optim = optim
            .load(ckpt.join("optim"))
            .map_err(|e| format!("loading {}: {e}", ckpt.join("optim").display()))?;
        stream.seek(st.data).map_err(|e| e.to_string())?;
        eprintln!("resumed dVAE training at step {}", st.step);
        state = st;
    }
    let metrics_path = out.join("metrics.jsonl");
    flava_vit::atomic::truncate_metrics(&metrics_path, state.step as u64).map_err(io)?;
    if !resume {
        std::fs::remove_file(&metrics_path).ok();
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(io)?;
    let started = Instant::now();
    let base_seconds = state.train_seconds;
    let v = cfg.codebook.vocab_size;
    let mut last = DvaeMetrics::default();
    // The checkpoint directory is written whole (model, optimizer and state of one step) and
    // swapped in, so a crash or a full disk mid-save leaves the previous checkpoint intact.
    let save = |model: &Dvae, optim: &burn::optim::ModuleOptimizer, state: &DvaeState| -> Result<(), String> {
        let dir = flava_vit::atomic::AtomicDir::new(&ckpt).map_err(io)?;
        model
            .clone()
            .save_file(dir.path().join("model"))
            .map_err(|e| e.to_string())?;
        optim.save(dir.path().join("optim")).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.path().join("state.json"),
            serde_json::to_string(state).expect("json"),
        )
        .map_err(io)?;
        hooks.before_commit(state.step, dir.path());
        dir.commit().map_err(io)?;
        Ok(())
    };
    while state.step < cfg.steps {
        let seconds = base_seconds + started.elapsed().as_secs_f64();
        if cfg.time_limit_s.is_some_and(|l| seconds >= l) {
            eprintln!("time limit reached after {} steps", state.step);
            break;
        }
        let t0 = Instant::now();
        let imgs = read_images(&mut stream, cfg.batch_size, cfg, state.step as u64)?;
        for img in &imgs {
            state.mean_count += 1;
            let k = state.mean_count as f64;
            for (m, &p) in state.mean_image.iter_mut().zip(img) {
                *m += ((p as f64 - 0.1) / 0.8 - *m) / k;
            }
        }
        let x = batch_tensor(&imgs, s, &ad);
        let logits = model.encoder.forward(x.clone());
        let p = progress(cfg, state.step, seconds);
        let tau = tau_at(cfg, p);
        let u = uniform_noise(logits.dims(), cfg.seed, state.step as u64, &ad);
        let gumbel = u.log().neg().log().neg() * noise_scale(cfg, p);
        let soft = softmax((logits.clone() + gumbel) / tau, 1);
        let out_px = model.decoder.forward(soft);
        let target = (x.clone() - 0.1) / 0.8;
        let (rec_loss, pred) = match cfg.reconstruction {
            Reconstruction::L2 => {
                let pred = sigmoid(out_px.slice(s![.., 0..3, .., ..]));
                ((pred.clone() - target.clone()).square().mean(), pred)
            }
            Reconstruction::LogitLaplace => {
                let mu = out_px.clone().slice(s![.., 0..3, .., ..]);
                let ln_b = out_px.slice(s![.., 3..6, .., ..]);
                let xm = x.clone().clamp(1e-4, 1.0 - 1e-4);
                let logit_x = xm.clone().log() - (xm.clone().neg() + 1.0).log();
                let nll = ln_b.clone()
                    + xm.clone().log()
                    + (xm.neg() + 1.0).log()
                    + (logit_x - mu.clone()).abs() * ln_b.neg().exp()
                    + std::f64::consts::LN_2;
                (nll.mean(), sigmoid(mu))
            }
        };
        let logq = log_softmax(logits.clone(), 1);
        let kl = (logq.clone().exp() * (logq + (v as f64).ln())).sum_dim(1).mean();
        let usage_kl = usage_kl(logits.clone());
        let beta = cfg.kl_weight * ((state.step + 1) as f64 / cfg.kl_warmup.max(1) as f64).min(1.0);
        let loss = rec_loss.clone() + kl.clone() * beta + usage_kl.clone() * cfg.usage_weight;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = lr_at(cfg, state.step, p);
        model = optim.step(lr, model, grads);
        state.step += 1;
        state.train_seconds = base_seconds + started.elapsed().as_secs_f64();
        state.data = stream.position();
        let mse = (pred.detach() - target.detach()).square().mean().into_scalar::<f64>();
        let hard: Vec<i64> = logits
            .detach()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec()
            .unwrap_or_default();
        let mut counts = vec![0u64; v];
        hard.iter().for_each(|&c| counts[c as usize] += 1);
        last = DvaeMetrics {
            step: state.step,
            loss: loss.into_scalar::<f64>(),
            reconstruction: rec_loss.into_scalar::<f64>(),
            kl: kl.into_scalar::<f64>(),
            usage_kl: usage_kl.into_scalar::<f64>(),
            psnr: psnr(mse),
            perplexity: perplexity(&counts),
            tau,
            lr,
            step_time_s: t0.elapsed().as_secs_f64(),
        };
        use std::io::Write;
        writeln!(metrics, "{}", serde_json::to_string(&last).expect("json")).map_err(io)?;
        on_step(&last);
        if !last.loss.is_finite() {
            save(&model, &optim, &state)?;
            return Err(format!(
                "non-finite dVAE loss at step {}; saved the last checkpoint",
                state.step
            ));
        }
        if state.step.is_multiple_of(cfg.checkpoint_every.max(1)) {
            save(&model, &optim, &state)?;
        }
    }
    save(&model, &optim, &state)?;
    let valid = model.valid();
    let codebook_dir = flava_vit::atomic::AtomicDir::new(out.join("codebook")).map_err(io)?;
    save_codebook(&valid.encoder, &cfg.codebook, codebook_dir.path()).map_err(|e| e.to_string())?;
    codebook_dir.commit().map_err(io)?;
    let dec = flava_vit::weights::module_state_dict(&valid.decoder, "", &[]);
    dec.save_safetensors(out.join("decoder.safetensors"))
        .map_err(|e| e.to_string())?;
    Ok(TrainedDvae {
        model: valid,
        state,
        last,
        data: stream.stats.clone(),
    })
}

/// Loads a trained dVAE (`dvae_config.json`, `checkpoint/model.bpk`) for reconstruction.
pub fn load_trained(dir: &Path, device: &Device) -> Result<(Dvae, DvaeTrainConfig), String> {
    let cfg: DvaeTrainConfig = serde_json::from_str(
        &std::fs::read_to_string(dir.join("dvae_config.json"))
            .map_err(|e| format!("{}: {e}", dir.join("dvae_config.json").display()))?,
    )
    .map_err(|e| e.to_string())?;
    let model = Dvae::new(&cfg, device)
        .try_load_file(dir.join("checkpoint/model"))
        .map_err(|e| e.to_string())?;
    Ok((model, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_term_is_zero_for_even_use_and_ln_v_for_one_code() {
        let device = Device::flex();
        // Two positions, confident on different codes of 2: the average is uniform.
        let even = Tensor::<4>::from_data(TensorData::new(vec![30f32, -30., -30., 30.], [1, 2, 1, 2]), &device);
        assert!(usage_kl(even).into_scalar::<f64>().abs() < 1e-6);
        // Both positions on code 0 of 4: ln 4.
        let one = Tensor::<4>::from_data(
            TensorData::new(vec![30f32, 30., -30., -30., -30., -30., -30., -30.], [1, 4, 1, 2]),
            &device,
        );
        assert!((usage_kl(one).into_scalar::<f64>() - 4f64.ln()).abs() < 1e-5);
        // Per-position uncertainty does not count: every position uniform gives 0 too.
        let flat = Tensor::<4>::zeros([2, 4, 3, 3], &device);
        assert!(usage_kl(flat).into_scalar::<f64>().abs() < 1e-6);
    }

    #[test]
    fn schedules_follow_steps_or_time_whichever_is_further() {
        let mut cfg = DvaeTrainConfig {
            steps: 2000,
            warmup: 20,
            lr: 1e-3,
            tau_start: 1.0,
            tau_end: 0.25,
            ..Default::default()
        };
        // Without a time limit: steps only.
        assert_eq!(progress(&cfg, 500, 1e6), 0.25);
        // A run cut at 45 s after 200 of 2000 steps ends fully annealed.
        cfg.time_limit_s = Some(45.0);
        assert_eq!(progress(&cfg, 200, 45.0), 1.0);
        assert!((progress(&cfg, 200, 22.5) - 0.5).abs() < 1e-12);
        assert_eq!(progress(&cfg, 1500, 9.0), 0.75);
        assert!((tau_at(&cfg, 1.0) - 0.25).abs() < 1e-12);
        assert!((tau_at(&cfg, 0.5) - 0.5).abs() < 1e-12);
        assert!((lr_at(&cfg, 200, 1.0) - 1e-4).abs() < 1e-12);
        assert!((lr_at(&cfg, 200, 0.0) - 1e-3).abs() < 1e-12);
        assert_eq!(noise_scale(&cfg, 0.25), 0.5);
        assert_eq!(noise_scale(&cfg, 0.75), 1.0);
        cfg.noise_warmup = 0.0;
        assert_eq!(noise_scale(&cfg, 0.0), 1.0);
        // Warmup is counted in steps.
        assert!((lr_at(&cfg, 9, 0.9) - 5e-4).abs() < 1e-12);
    }
}
