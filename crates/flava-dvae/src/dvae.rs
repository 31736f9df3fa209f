//! A dVAE of one's own: encoder and decoder ([`Dvae`]), its losses in one call ([`Dvae::losses`]:
//! Gumbel-softmax relaxation with an annealed temperature, KL to the uniform prior, the code-usage
//! term, an L2 or logit-Laplace reconstruction), the schedules of its training settings
//! ([`DvaeTrainConfig`]), DALL-E's pixel mapping, and the metrics that tell whether a codebook is
//! good: reconstruction PSNR against predicting the mean image, perplexity and codes used. The
//! training loop is `flava_train::dvae` (data, optimizer, checkpoints).

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

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
    /// The cosine decay ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
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
            min_lr_ratio: 0.1,
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

/// Why a dVAE training configuration is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DvaeConfigError {
    /// The codebook's sizes are over a limit or do not fit together.
    #[error("dVAE codebook: {0}")]
    Codebook(#[from] flava_vit::InvalidConfig),
    /// A size over the [`flava_vit::limits`].
    #[error(transparent)]
    Limit(#[from] flava_vit::LimitError),
    /// A field that must be a positive number.
    #[error("dVAE {field} must be a positive number, got {value}")]
    NotPositive {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// A field that must be zero or more.
    #[error("dVAE {field} must be ≥ 0, got {value}")]
    Negative {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// `min_lr_ratio` outside [0, 1].
    #[error("dVAE min_lr_ratio must be in [0, 1], got {0}")]
    MinLrRatio(f64),
    /// A count of zero.
    #[error("dVAE batch_size, steps and checkpoint_every must be at least 1")]
    ZeroCount,
    /// An image size the encoder's three halvings cannot take.
    #[error("dVAE image_size must be a multiple of 8, got {0}")]
    ImageSize(u32),
    /// A time limit that is not a positive number of seconds.
    #[error("dVAE time_limit_s must be a positive number of seconds")]
    TimeLimit,
    /// `--resume` with settings a resumed run may not change.
    #[error("--resume: the run was started with other settings ({}); resume with the same settings, or start a new run", .0.join(", "))]
    Changed(Vec<String>),
}

impl DvaeTrainConfig {
    /// Checks values that would fail later, or train nonsense, with a clear message.
    pub fn validate(&self) -> Result<(), DvaeConfigError> {
        self.codebook.validate()?;
        let positive = [
            ("lr", self.lr),
            ("tau_start", self.tau_start),
            ("tau_end", self.tau_end),
        ];
        if let Some(&(field, value)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(DvaeConfigError::NotPositive { field, value });
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            return Err(DvaeConfigError::MinLrRatio(self.min_lr_ratio));
        }
        let non_negative = [
            ("weight_decay", self.weight_decay),
            ("kl_weight", self.kl_weight),
            ("usage_weight", self.usage_weight),
            ("noise_warmup", self.noise_warmup),
        ];
        if let Some(&(field, value)) = non_negative.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            return Err(DvaeConfigError::Negative { field, value });
        }
        if self.batch_size == 0 || self.steps == 0 || self.checkpoint_every == 0 {
            return Err(DvaeConfigError::ZeroCount);
        }
        if self.image_size < 8 || !self.image_size.is_multiple_of(8) {
            return Err(DvaeConfigError::ImageSize(self.image_size));
        }
        flava_vit::limits::current().check_dim("dVAE image_size", self.image_size as u64)?;
        if self.time_limit_s.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
            return Err(DvaeConfigError::TimeLimit);
        }
        Ok(())
    }

    /// `Err` naming the fields that a resumed run may not change (the model, the data
    /// transform, the losses); steps, the time limit and checkpointing may change.
    pub fn check_resumable(&self, saved: &DvaeTrainConfig) -> Result<(), DvaeConfigError> {
        let norm = |c: &DvaeTrainConfig| DvaeTrainConfig {
            steps: 0,
            time_limit_s: None,
            checkpoint_every: 0,
            ..c.clone()
        };
        if norm(self) == norm(saved) {
            return Ok(());
        }
        let json = |c: &DvaeTrainConfig| serde_json::to_value(norm(c)).unwrap_or_default();
        let (a, b) = (json(saved), json(self));
        let changed: Vec<String> = a
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        Err(DvaeConfigError::Changed(changed))
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

/// DALL-E's pixel mapping into the encoder's input range: `0.8·x + 0.1` for `x` in [0, 1]
/// (keeps the logit-Laplace likelihood away from 0 and 1).
pub fn map_pixels(x: Tensor<4>) -> Tensor<4> {
    x * (1.0 - 2.0 * LOGIT_LAPLACE_EPS) + LOGIT_LAPLACE_EPS
}

/// The inverse of [`map_pixels`]: `(x − 0.1) / 0.8`.
pub fn unmap_pixels(x: Tensor<4>) -> Tensor<4> {
    (x - LOGIT_LAPLACE_EPS) / (1.0 - 2.0 * LOGIT_LAPLACE_EPS)
}

/// [`unmap_pixels`] of one value.
pub fn unmap_pixel(x: f64) -> f64 {
    (x - LOGIT_LAPLACE_EPS) / (1.0 - 2.0 * LOGIT_LAPLACE_EPS)
}

/// DALL-E's ε of the pixel mapping.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// The terms of one dVAE training step, each `[1]` (autodiff through all of them).
#[derive(Debug, Clone)]
pub struct DvaeLosses {
    /// `reconstruction + β·kl + usage_weight·usage_kl`.
    pub total: Tensor<1>,
    /// Reconstruction (L2, or the logit-Laplace negative log-likelihood).
    pub reconstruction: Tensor<1>,
    /// KL to the uniform prior (nats per position).
    pub kl: Tensor<1>,
    /// KL from the batch's average code distribution to uniform (nats).
    pub usage_kl: Tensor<1>,
    /// The relaxed reconstruction in [0, 1], [B, 3, H, W].
    pub prediction: Tensor<4>,
    /// The target in [0, 1], [B, 3, H, W].
    pub target: Tensor<4>,
    /// The encoder's logits [B, V, h, w].
    pub logits: Tensor<4>,
}

/// How one step relaxes the codes and weighs the terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSettings {
    /// Gumbel-softmax temperature.
    pub tau: f64,
    /// Scale of the Gumbel noise (0 = plain softmax).
    pub noise_scale: f64,
    /// Weight of the KL to the uniform prior.
    pub kl_weight: f64,
    /// Weight of the usage term.
    pub usage_weight: f64,
    /// The reconstruction loss.
    pub reconstruction: Reconstruction,
}

impl Dvae {
    /// The losses of mapped pixels `x` [B, 3, H, W] with uniform noise `u` in (0, 1) of the
    /// logits' shape [B, V, H/8, W/8] (Gumbel noise is `−ln(−ln u)`).
    pub fn losses(&self, x: Tensor<4>, u: Tensor<4>, s: &LossSettings) -> DvaeLosses {
        let logits = self.encoder.forward(x.clone());
        let v = logits.dims()[1];
        let gumbel = u.log().neg().log().neg() * s.noise_scale;
        let soft = softmax((logits.clone() + gumbel) / s.tau, 1);
        let out_px = self.decoder.forward(soft);
        let target = unmap_pixels(x.clone());
        let (reconstruction, prediction) = match s.reconstruction {
            Reconstruction::L2 => {
                let pred = sigmoid(out_px.slice(s![.., 0..3, .., ..]));
                ((pred.clone() - target.clone()).square().mean(), pred)
            }
            Reconstruction::LogitLaplace => {
                let mu = out_px.clone().slice(s![.., 0..3, .., ..]);
                let ln_b = out_px.slice(s![.., 3..6, .., ..]);
                let xm = x.clamp(1e-4, 1.0 - 1e-4);
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
        let usage = usage_kl(logits.clone());
        let total = reconstruction.clone() + kl.clone() * s.kl_weight + usage.clone() * s.usage_weight;
        DvaeLosses {
            total,
            reconstruction,
            kl,
            usage_kl: usage,
            prediction,
            target,
            logits,
        }
    }
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

/// PSNR in dB of a mean squared error on [0, 1] pixels.
pub fn psnr(mse: f64) -> f64 {
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

/// Perplexity of code counts.
pub fn perplexity(counts: &[u64]) -> f64 {
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
pub fn progress(cfg: &DvaeTrainConfig, step: usize, seconds: f64) -> f64 {
    let by_steps = step as f64 / cfg.steps.max(1) as f64;
    let by_time = cfg.time_limit_s.map_or(0.0, |l| seconds / l.max(1e-9));
    by_steps.max(by_time).min(1.0)
}

/// The usage term: KL from the average code distribution over the batch and grid to the
/// uniform one, `ln V − H(mean q)`, for encoder logits [B, V, h, w]; returns `[1]`. It is 0 when
/// codes are used equally often, `ln V` when every position picks the same code.
pub fn usage_kl(logits: Tensor<4>) -> Tensor<1> {
    let v = logits.dims()[1];
    let q = softmax(logits, 1);
    let q_mean = q.permute([1, 0, 2, 3]).reshape([v as i64, -1]).mean_dim(1).reshape([v]);
    (q_mean.clone() * (q_mean.clamp_min(1e-12).log() + (v as f64).ln())).sum()
}

/// Scale of the Gumbel noise: rises linearly from 0 to 1 over the first `noise_warmup` of
/// training.
pub fn noise_scale(cfg: &DvaeTrainConfig, progress: f64) -> f64 {
    if cfg.noise_warmup <= 0.0 {
        1.0
    } else {
        (progress / cfg.noise_warmup).min(1.0)
    }
}

/// The Gumbel-softmax temperature: exponential from `tau_start` to `tau_end` over training.
pub fn tau_at(cfg: &DvaeTrainConfig, progress: f64) -> f64 {
    cfg.tau_start * (cfg.tau_end / cfg.tau_start).powf(progress)
}

/// Images ([3·S·S] each) as one [N, 3, S, S] tensor.
pub fn batch_tensor(imgs: &[Vec<f32>], s: usize, device: &Device) -> Tensor<4> {
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
        let target = unmap_pixels(x.clone());
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

/// Uniform noise in (0, 1) of `dims` from `(seed, step)`: the same for a resumed run.
pub fn uniform_noise(dims: [usize; 4], seed: u64, step: u64, device: &Device) -> Tensor<4> {
    use rand::Rng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xD1CE_5EED);
    rng.set_stream(step);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(1e-10f32..1.0 - 1e-7)).collect();
    Tensor::from_data(TensorData::new(v, dims), device)
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
        assert_eq!(noise_scale(&cfg, 0.25), 0.5);
        assert_eq!(noise_scale(&cfg, 0.75), 1.0);
        cfg.noise_warmup = 0.0;
        assert_eq!(noise_scale(&cfg, 0.0), 1.0);
    }
}
