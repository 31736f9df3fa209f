//! Turning decoded samples into training batches: transforms, BEiT masks, tokenization, MLM
//! masking, ITM negatives, and collation into Burn tensors. One batch holds one task.

use burn::prelude::*;
use flava_text::Tokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::masking::{BlockMaskConfig, BlockMaskGenerator, MaskConfigError};
use crate::mlm::{mask_tokens, MlmConfig};
use crate::stream::DecodedSample;
use crate::task::Task;
use crate::transforms::{eval_transform, train_transform, TrainTransformConfig};

/// How batches are built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Image transform (sizes, crop scale and ratio, flip).
    pub transform: TrainTransformConfig,
    /// Random crops (training) or the evaluation squash.
    pub train: bool,
    /// BEiT masking over the patch grid (its height/width must equal image_size / patch_size).
    pub mask: BlockMaskConfig,
    /// MLM masking.
    pub mlm: MlmConfig,
    /// Text length in tokens.
    pub max_length: usize,
    /// Probability that a pair gets another sample's caption (ITM negative, label 0).
    pub itm_negative_prob: f64,
    /// Seed of every per-sample random choice.
    pub seed: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            transform: TrainTransformConfig::default(),
            train: true,
            mask: BlockMaskConfig::default(),
            mlm: MlmConfig::default(),
            max_length: 77,
            itm_negative_prob: 0.1,
            seed: 0,
        }
    }
}

/// A batch on the host, row-major, before it becomes tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Which task the batch serves.
    pub task: Task,
    /// Sample keys.
    pub keys: Vec<String>,
    /// Class labels (ImageFolder, synthetic classes), when present.
    pub labels: Vec<Option<String>>,
    /// Texts as given (after ITM substitution).
    pub texts: Vec<String>,
    /// [B, 3, S, S] encoder pixels (empty for text batches).
    pub pixel_values: Vec<f32>,
    /// [B, 3, C, C] codebook pixels (empty for text batches).
    pub codebook_pixel_values: Vec<f32>,
    /// [B, grid] BEiT mask, `true` = masked (empty for text batches).
    pub bool_masked_pos: Vec<bool>,
    /// [B, L] token ids (empty for image batches).
    pub input_ids: Vec<u32>,
    /// [B, L] ids after MLM masking.
    pub input_ids_masked: Vec<u32>,
    /// [B, L] 1 = token, 0 = padding.
    pub attention_mask: Vec<u32>,
    /// MLM targets: flattened positions `b·L + l`, increasing.
    pub mlm_positions: Vec<usize>,
    /// MLM targets: original ids at `mlm_positions`.
    pub mlm_targets: Vec<u32>,
    /// `[B]` 1 = matching pair, 0 = ITM negative (pairs only).
    pub itm_labels: Vec<u32>,
    /// Texts cut to `max_length`.
    pub truncated: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Encoder image side.
    pub image_size: usize,
    /// Codebook image side.
    pub codebook_size: usize,
    /// Cells of the mask grid.
    pub grid: usize,
    /// Text length.
    pub max_length: usize,
}

/// The same batch as Burn tensors.
#[derive(Debug, Clone)]
pub struct FlavaBatch {
    /// Which task.
    pub task: Task,
    /// [B, 3, S, S]
    pub pixel_values: Option<Tensor<4>>,
    /// [B, 3, C, C]
    pub codebook_pixel_values: Option<Tensor<4>>,
    /// [B, grid]
    pub bool_masked_pos: Option<Tensor<2, Bool>>,
    /// [B, L]
    pub input_ids: Option<Tensor<2, Int>>,
    /// [B, L]
    pub input_ids_masked: Option<Tensor<2, Int>>,
    /// [B, L]
    pub attention_mask: Option<Tensor<2, Int>>,
    /// `[n_targets]` flattened positions `b·L + l`.
    pub mlm_positions: Option<Tensor<1, Int>>,
    /// `[n_targets]`
    pub mlm_targets: Option<Tensor<1, Int>>,
    /// `[B]`
    pub itm_labels: Option<Tensor<1, Int>>,
}

fn ints(v: &[u32], shape: Vec<usize>, device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), shape),
        device,
    )
}

impl HostBatch {
    /// The batches' rows one after another, as one batch (the inverse of [`HostBatch::split`];
    /// MLM positions re-based). All parts share the task and sizes; one part is returned as is.
    ///
    /// # Panics
    /// When `parts` is empty.
    pub fn concat(parts: Vec<HostBatch>) -> HostBatch {
        let mut it = parts.into_iter();
        let mut out = it.next().expect("at least one batch to concatenate");
        for p in it {
            let base = out.batch_size * out.max_length;
            out.keys.extend(p.keys);
            out.labels.extend(p.labels);
            out.texts.extend(p.texts);
            out.pixel_values.extend(p.pixel_values);
            out.codebook_pixel_values.extend(p.codebook_pixel_values);
            out.bool_masked_pos.extend(p.bool_masked_pos);
            out.input_ids.extend(p.input_ids);
            out.input_ids_masked.extend(p.input_ids_masked);
            out.attention_mask.extend(p.attention_mask);
            out.mlm_positions.extend(p.mlm_positions.iter().map(|x| x + base));
            out.mlm_targets.extend(p.mlm_targets);
            out.itm_labels.extend(p.itm_labels);
            out.truncated += p.truncated;
            out.batch_size += p.batch_size;
        }
        out
    }

    /// Splits the batch into `k` micro-batches of equal size (rows in order; MLM positions
    /// re-based). `k` must divide the batch size.
    pub fn split(&self, k: usize) -> Vec<HostBatch> {
        assert!(
            k > 0 && self.batch_size.is_multiple_of(k),
            "{k} micro-batches of {}",
            self.batch_size
        );
        let per = self.batch_size / k;
        let (l, g) = (self.max_length, self.grid);
        let (px, cb) = (
            3 * self.image_size * self.image_size,
            3 * self.codebook_size * self.codebook_size,
        );
        let rows = |v: &[f32], n: usize, i: usize| {
            if v.is_empty() {
                vec![]
            } else {
                v[i * per * n..(i + 1) * per * n].to_vec()
            }
        };
        (0..k)
            .map(|i| {
                let (a, b) = (i * per, (i + 1) * per);
                let pick_u32 = |v: &[u32], n: usize| if v.is_empty() { vec![] } else { v[a * n..b * n].to_vec() };
                let (mlm_positions, mlm_targets) = self
                    .mlm_positions
                    .iter()
                    .zip(&self.mlm_targets)
                    .filter(|(&p, _)| p / l >= a && p / l < b)
                    .map(|(&p, &t)| (p - a * l, t))
                    .unzip();
                HostBatch {
                    task: self.task,
                    keys: self.keys[a..b].to_vec(),
                    labels: self.labels[a..b].to_vec(),
                    texts: if self.texts.is_empty() {
                        vec![]
                    } else {
                        self.texts[a..b].to_vec()
                    },
                    pixel_values: rows(&self.pixel_values, px, i),
                    codebook_pixel_values: rows(&self.codebook_pixel_values, cb, i),
                    bool_masked_pos: if self.bool_masked_pos.is_empty() {
                        vec![]
                    } else {
                        self.bool_masked_pos[a * g..b * g].to_vec()
                    },
                    input_ids: pick_u32(&self.input_ids, l),
                    input_ids_masked: pick_u32(&self.input_ids_masked, l),
                    attention_mask: pick_u32(&self.attention_mask, l),
                    mlm_positions,
                    mlm_targets,
                    itm_labels: pick_u32(&self.itm_labels, 1),
                    truncated: 0,
                    batch_size: per,
                    ..self.clone()
                }
            })
            .collect()
    }

    /// Moves the batch to `device` as tensors.
    pub fn to_device(&self, device: &Device) -> FlavaBatch {
        let b = self.batch_size;
        let has_img = !self.pixel_values.is_empty();
        let has_txt = !self.input_ids.is_empty();
        let l = self.max_length;
        let img4 = |v: &Vec<f32>, s: usize| Tensor::<4>::from_data(TensorData::new(v.clone(), [b, 3, s, s]), device);
        let one = |v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), device);
        FlavaBatch {
            task: self.task,
            pixel_values: has_img.then(|| img4(&self.pixel_values, self.image_size)),
            codebook_pixel_values: has_img.then(|| img4(&self.codebook_pixel_values, self.codebook_size)),
            bool_masked_pos: has_img.then(|| {
                Tensor::<2, Bool>::from_data(TensorData::new(self.bool_masked_pos.clone(), [b, self.grid]), device)
            }),
            input_ids: has_txt.then(|| ints(&self.input_ids, vec![b, l], device)),
            input_ids_masked: has_txt.then(|| ints(&self.input_ids_masked, vec![b, l], device)),
            attention_mask: has_txt.then(|| ints(&self.attention_mask, vec![b, l], device)),
            mlm_positions: has_txt.then(|| one(self.mlm_positions.iter().map(|&p| p as i64).collect())),
            mlm_targets: has_txt.then(|| one(self.mlm_targets.iter().map(|&t| t as i64).collect())),
            itm_labels: (self.task == Task::Pairs).then(|| one(self.itm_labels.iter().map(|&t| t as i64).collect())),
        }
    }
}

/// Builds batches from decoded samples.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    /// The configuration.
    pub cfg: BatchConfig,
    tokenizer: Option<Tokenizer>,
    continuation: Vec<bool>,
    masks: BlockMaskGenerator,
}

/// A per-sample RNG: a pure function of (seed, task, batch index, sample index).
fn sample_rng(seed: u64, task: Task, batch: u64, i: usize) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ (batch.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ ((task as u64) << 56));
    r.set_stream(i as u64 + 1);
    r
}

/// Why a batch cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The block-mask settings are refused.
    #[error("masking: {0}")]
    Mask(#[from] MaskConfigError),
    /// A text task without a tokenizer.
    #[error("a {0} batch needs a tokenizer")]
    NoTokenizer(Task),
    /// The tokenizer failed on the batch's texts.
    #[error("tokenizing: {0}")]
    Tokenize(#[from] flava_text::TokenizerError),
}

impl BatchBuilder {
    /// A builder; text tasks need a tokenizer.
    pub fn new(cfg: BatchConfig, tokenizer: Option<Tokenizer>) -> Result<Self, BatchError> {
        let masks = BlockMaskGenerator::new(cfg.mask.clone())?;
        let continuation = match &tokenizer {
            Some(t) => (0..t.vocab_size() as u32)
                .map(|i| t.inner().id_to_token(i).is_some_and(|s| s.starts_with("##")))
                .collect(),
            None => vec![],
        };
        Ok(Self {
            cfg,
            tokenizer,
            continuation,
            masks,
        })
    }

    /// Builds batch number `index` of `task` from `samples` (image work runs on the current rayon
    /// pool). Returns an error only for a text task without tokenizer.
    pub fn build(&self, task: Task, samples: Vec<DecodedSample>, index: u64) -> Result<HostBatch, BatchError> {
        let cfg = &self.cfg;
        let b = samples.len();
        let t = &cfg.transform;
        let (s, c) = (t.image_size as usize, t.codebook_size as usize);
        let mut out = HostBatch {
            task,
            keys: samples.iter().map(|x| x.key.clone()).collect(),
            labels: samples.iter().map(|x| x.label.clone()).collect(),
            texts: vec![],
            pixel_values: vec![],
            codebook_pixel_values: vec![],
            bool_masked_pos: vec![],
            input_ids: vec![],
            input_ids_masked: vec![],
            attention_mask: vec![],
            mlm_positions: vec![],
            mlm_targets: vec![],
            itm_labels: vec![],
            truncated: 0,
            batch_size: b,
            image_size: s,
            codebook_size: c,
            grid: self.masks.len(),
            max_length: cfg.max_length,
        };
        if matches!(task, Task::Pairs | Task::Images) {
            let per: Vec<_> = samples
                .par_iter()
                .enumerate()
                .map(|(i, x)| {
                    let mut rng = sample_rng(cfg.seed, task, index, i);
                    let img = x.image.as_ref().expect("decoded for an image task");
                    let two = if cfg.train {
                        train_transform(img, t, &mut rng)
                    } else {
                        eval_transform(img, t.image_size, t.codebook_size)
                    };
                    (two, self.masks.generate(&mut rng))
                })
                .collect();
            for (two, mask) in per {
                out.pixel_values.extend(two.pixels);
                out.codebook_pixel_values.extend(two.codebook);
                out.bool_masked_pos.extend(mask);
            }
        }
        if matches!(task, Task::Pairs | Task::Text) {
            let tok = self.tokenizer.as_ref().ok_or(BatchError::NoTokenizer(task))?;
            let mut texts: Vec<String> = samples.iter().map(|x| x.text.clone().unwrap_or_default()).collect();
            if task == Task::Pairs {
                // ITM negatives: another sample's (different) caption, label 0.
                let mut rng = sample_rng(cfg.seed, task, index, usize::MAX - 1);
                let orig = texts.clone();
                out.itm_labels = vec![1; b];
                for i in 0..b {
                    if rng.random::<f64>() < cfg.itm_negative_prob {
                        let others: Vec<usize> = (0..b).filter(|&j| orig[j] != orig[i]).collect();
                        if !others.is_empty() {
                            texts[i] = orig[others[rng.random_range(0..others.len())]].clone();
                            out.itm_labels[i] = 0;
                        }
                    }
                }
            }
            let enc = tok.encode_batch(&texts, cfg.max_length)?;
            out.truncated = enc.truncated.iter().filter(|&&t| t).count();
            let sp = tok.special_tokens();
            let vocab = tok.vocab_size() as u32;
            for (i, ids) in enc.input_ids.iter().enumerate() {
                let special: Vec<bool> = ids.iter().map(|&x| x == sp.cls || x == sp.sep || x == sp.pad).collect();
                let cont: Vec<bool> = ids
                    .iter()
                    .map(|&x| self.continuation.get(x as usize).copied().unwrap_or(false))
                    .collect();
                let mut rng = sample_rng(cfg.seed, task, index, i + (1 << 20));
                let m = mask_tokens(ids, &special, &cont, sp.mask, vocab, &cfg.mlm, &mut rng);
                out.input_ids.extend(ids);
                out.input_ids_masked.extend(&m.input_ids);
                out.attention_mask.extend(&enc.attention_mask[i]);
                out.mlm_positions
                    .extend(m.positions.iter().map(|p| i * cfg.max_length + p));
                out.mlm_targets.extend(m.targets);
            }
            out.texts = texts;
        }
        Ok(out)
    }
}
