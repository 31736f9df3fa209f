//! Fine-tuning FLAVA on a downstream task (`flava finetune`): a task head
//! ([`FlavaForClassification`]) on the CLS of the encoder the task reads, trained with the
//! workspace's [`Trainer`] (optimizer groups, schedule, clipping, non-finite guard), validated
//! every `val_every` steps, the best model by the task's metric kept in `model/`.
//!
//! Run directory (`--out`): `config.toml`, `checkpoints/step-N/`, `metrics.jsonl` (one line
//! per step, and `{"val": …}` lines), `model/` (`config.json` with the head and the label names,
//! `model.safetensors` with HF backbone keys and `classifier.model.{0,3}.*`, the tokenizer and
//! `preprocessor_config.json`; `flava eval` and `flava embed` load it as a `FlavaModel`),
//! `eval.json` (`{"task", "metric", "accuracy", … "n"}` of the best validation), `report.html`
//! ([`crate::report`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::prelude::*;
use flava_data::processor::{ImageProcessor, ImageProcessorConfig};
use flava_data::tasks::{open_task, Example, TaskOptions, TaskSet};
use flava_fusion::checkpoint::load_flava_model;
use flava_fusion::{FlavaConfig, FlavaModel, Tower};
use flava_objectives::{ClassifierConfig, FlavaForClassification};
use flava_text::Tokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::observer::{Observer, Quiet};
use crate::optim::OptimizerConfig;
use crate::run_dir::{RunDir, RunState};
use crate::task_model::{evaluate, save_task_model};
pub use crate::task_model::{Augment, Batcher, FinetuneBatch, TaskEval, TaskHead};
use crate::trainer::{Computed, Counters, Objective, Trainer, TrainerConfig};

/// Every option of a fine-tuning run (`flava finetune --print-config` shows them as TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// A FLAVA model directory (ours, or HF's); `none` trains from scratch (`preset` sizes, a
    /// tokenizer trained on the task's text).
    pub init: String,
    /// Training data spec ([`flava_data::tasks`]).
    pub data: String,
    /// Validation data spec; `None` holds out 10% of the training data (for `synthetic:NAME`,
    /// the held-out scenes `synthetic:NAME:heldout`).
    pub val: Option<String>,
    /// Updates.
    pub steps: usize,
    /// Epochs instead of steps (steps = epochs · examples / batch size).
    pub epochs: Option<f64>,
    /// Examples per update.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient-norm clipping (0 = off).
    pub grad_clip: f64,
    /// Towers not updated.
    pub freeze: Vec<Tower>,
    /// Run directory.
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `out`.
    #[serde(skip)]
    pub resume: bool,
    /// Validate (and keep the best model) every this many steps (and at the end).
    pub val_every: usize,
    /// Checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// Answers kept for VQA (the most frequent of the training data).
    pub num_answers: usize,
    /// Text length in tokens.
    pub max_length: usize,
    /// Width of the head's hidden layer (0: a linear head).
    pub head_hidden: usize,
    /// Dropout of the head.
    pub head_dropout: f64,
    /// Model sizes with `--init none`.
    pub preset: String,
    /// Synthetic set sizes (`synthetic:vqa` etc.).
    pub synthetic_len: usize,
    /// Training-time image augmentation; `None` trains on the evaluation transform.
    pub augment: Option<Augment>,
    /// Data order and head initialisation.
    pub seed: u64,
    /// Device (`cpu`, `cuda`, `wgpu`).
    pub device: String,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            init: "none".into(),
            data: "synthetic:vqa".into(),
            val: None,
            steps: 300,
            epochs: None,
            batch_size: 32,
            lr: 2e-4,
            warmup: 30,
            weight_decay: 0.01,
            grad_clip: 1.0,
            freeze: vec![],
            out: PathBuf::from("runs/finetune"),
            resume: false,
            val_every: 100,
            checkpoint_every: 100,
            num_answers: 3129,
            max_length: 32,
            head_hidden: 768,
            head_dropout: 0.5,
            preset: "tiny".into(),
            synthetic_len: 4000,
            augment: Some(Augment::default()),
            seed: 0,
            device: "cpu".into(),
        }
    }
}

impl FinetuneConfig {
    /// Values that would fail later or train nonsense.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || (self.steps == 0 && self.epochs.is_none()) {
            anyhow::bail!("--batch-size and --steps (or --epochs) must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            anyhow::bail!("--lr must be a positive number, got {}", self.lr);
        }
        if self.epochs.is_some_and(|e| !(e.is_finite() && e > 0.0)) {
            anyhow::bail!("--epochs must be a positive number");
        }
        if self.val_every == 0 || self.checkpoint_every == 0 {
            anyhow::bail!("--val-every and --checkpoint-every must be at least 1");
        }
        if !(0.0..1.0).contains(&self.head_dropout) {
            anyhow::bail!("head dropout must be in [0, 1), got {}", self.head_dropout);
        }
        if self.max_length < 2 || self.num_answers == 0 {
            anyhow::bail!("max_length must be at least 2 and num_answers at least 1");
        }
        if let Some(a) = &self.augment {
            a.validate()?;
        }
        Ok(())
    }
}

/// The fine-tuning objective: the head's task loss.
pub struct Finetuning;

impl Objective for Finetuning {
    type Model = FlavaForClassification;
    type Batch = FinetuneBatch;

    fn compute(
        &mut self,
        model: &Self::Model,
        batch: &Self::Batch,
        _step: usize,
        _total: usize,
    ) -> anyhow::Result<Computed> {
        let logits = model.forward(batch.input.clone())?;
        let loss = FlavaForClassification::loss(logits, &batch.targets)?;
        Ok(Computed::backward(loss, model, vec![]))
    }

    fn task(&self, _batch: &Self::Batch) -> String {
        "finetune".into()
    }

    fn samples(&self, batch: &Self::Batch) -> usize {
        batch.size
    }
}

/// Where a fine-tuning run stands (saved with each checkpoint).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinetuneState {
    /// Updates and the non-finite guard.
    #[serde(flatten)]
    pub counters: Counters,
    /// The best validation so far.
    pub best: Option<TaskEval>,
    /// Seconds of training.
    pub train_seconds: f64,
}

impl RunState for FinetuneState {
    fn set_counters(&mut self, counters: Counters) {
        self.counters = counters;
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct FinetuneSummary {
    /// Updates done.
    pub steps: usize,
    /// The best validation (also in `eval.json`).
    pub best: TaskEval,
    /// The model directory of the best validation.
    pub model_dir: PathBuf,
    /// Seconds of training in this invocation.
    pub train_seconds: f64,
}

/// The backbone, its configuration, tokenizer and processor: from `init`, or built from the
/// preset with a tokenizer trained on the task's text (`init = "none"`).
fn backbone(
    cfg: &FinetuneConfig,
    train: &TaskSet,
    device: &Device,
    observer: &mut dyn Observer,
) -> anyhow::Result<(FlavaModel, FlavaConfig, Tokenizer, ImageProcessor)> {
    if cfg.init != "none" {
        let dir = &crate::hub::resolve(Path::new(&cfg.init)).context("--init")?;
        let loaded = load_flava_model(dir, device).with_context(|| format!("--init {}", dir.display()))?;
        let tokenizer = ["tokenizer.json", "vocab.txt"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow::anyhow!("{} has no tokenizer.json or vocab.txt", dir.display()))?;
        let tokenizer = Tokenizer::from_file(tokenizer)?;
        let p = dir.join("preprocessor_config.json");
        let processor = if p.is_file() {
            ImageProcessor::from_file(&p)?
        } else {
            ImageProcessor::default()
        };
        return Ok((loaded.model, loaded.config, tokenizer, processor));
    }
    let mut texts: Vec<String> = train
        .examples
        .iter()
        .flat_map(|e| e.text.iter().chain(e.text_pair.iter()).cloned())
        .collect();
    if texts.is_empty() {
        texts.push("an image".into());
    }
    std::fs::create_dir_all(&cfg.out)?;
    let path = cfg.out.join("tokenizer.json");
    if !path.is_file() {
        let n = flava_text::train::train_wordpiece(texts.into_iter(), 1000, &path)?;
        observer.on_message(&format!(
            "tokenizer: WordPiece with {n} tokens trained on the task's text"
        ));
    }
    let tokenizer = Tokenizer::from_file(&path)?;
    let mut config = FlavaConfig::preset(&cfg.preset)?;
    config.text_config.vocab_size = tokenizer.vocab_size();
    config.validate()?;
    let side = config.image_config.image_size as u32;
    let processor = ImageProcessor::new(ImageProcessorConfig::square(side, side));
    Ok((FlavaModel::new(&config, device), config, tokenizer, processor))
}

/// Runs a fine-tuning (see the module docs). Progress and messages go to `observer`.
pub fn run(cfg: &FinetuneConfig, observer: &mut dyn Observer) -> anyhow::Result<FinetuneSummary> {
    cfg.validate()?;
    let device = crate::pick_device(&cfg.device)?;
    let ad = device.clone().autodiff();
    let topts = TaskOptions {
        synthetic_len: cfg.synthetic_len,
        seed: cfg.seed,
        ..Default::default()
    };
    let mut train = open_task(&cfg.data, &topts).with_context(|| format!("--data {}", cfg.data))?;
    let val_spec = cfg.val.clone().or_else(|| {
        (cfg.data.starts_with("synthetic:") && !cfg.data.ends_with(":heldout")).then(|| format!("{}:heldout", cfg.data))
    });
    let val_examples = match &val_spec {
        Some(v) => {
            let opts = TaskOptions {
                synthetic_len: (cfg.synthetic_len / 4).max(1),
                ..topts.clone()
            };
            open_task(v, &opts).with_context(|| format!("--val {v}"))?.examples
        }
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5EED);
            train.examples.shuffle(&mut rng);
            let k = (train.examples.len() / 10).max(1);
            train.examples.split_off(train.examples.len() - k)
        }
    };
    for (reason, n) in &train.skipped {
        observer.on_message(&format!("data: {n} record(s) skipped ({reason:?})"));
    }
    let head = TaskHead::of(&train, cfg.num_answers)?;
    let steps = match cfg.epochs {
        Some(e) => ((e * train.examples.len() as f64) / cfg.batch_size as f64)
            .ceil()
            .max(1.0) as usize,
        None => cfg.steps,
    };
    observer.on_message(&format!(
        "task {} ({:?}, {} outputs, metric {:?}): {} training, {} validation examples, {steps} steps",
        head.task,
        head.kind,
        head.outputs(),
        head.metric,
        train.examples.len(),
        val_examples.len()
    ));
    let run_dir = RunDir::new(&cfg.out);
    if !cfg.resume && run_dir.latest_step().is_some() {
        anyhow::bail!(
            "{} already holds a fine-tuning run; pass --resume to continue it, or choose another --out",
            cfg.out.display()
        );
    }
    let (flava, config, tokenizer, processor) = backbone(cfg, &train, &ad, observer)?;
    let classifier = ClassifierConfig {
        tower: head.tower(),
        num_classes: head.outputs(),
        hidden_size: cfg.head_hidden,
        dropout: cfg.head_dropout,
    };
    let model = FlavaForClassification::new(flava, &config, &classifier, &ad);
    let batcher = Batcher {
        head: head.clone(),
        tokenizer,
        processor,
        max_length: cfg.max_length,
        keep_unlabelled: false,
    };
    let mut trainer = Trainer::new(
        model,
        Finetuning,
        TrainerConfig {
            optimizer: OptimizerConfig {
                lr: cfg.lr,
                warmup: cfg.warmup,
                weight_decay: cfg.weight_decay,
                grad_clip: cfg.grad_clip,
                freeze: cfg.freeze.clone(),
                ..Default::default()
            },
            steps,
            max_nonfinite: 5,
        },
    );
    std::fs::create_dir_all(&cfg.out)?;
    flava_vit::atomic::write_file(&cfg.out.join("config.toml"), toml::to_string_pretty(cfg)?.as_bytes())?;
    let mut state = FinetuneState::default();
    if cfg.resume {
        let resumed = run_dir.resume(
            |dir, st: FinetuneState| {
                trainer.load_records(dir, st.counters)?;
                Ok(st)
            },
            observer,
        )?;
        if let Some(r) = resumed {
            observer.on_message(&format!("resumed fine-tuning at step {}", r.step));
            state = r.value;
        }
    }
    let mut metrics_log = run_dir.metrics(state.counters.step)?;
    let per_epoch = train.examples.len().div_ceil(cfg.batch_size).max(1);
    let order_of = |epoch: usize| {
        let mut order: Vec<usize> = (0..train.examples.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64)));
        order
    };
    let keep = 2;
    let started = Instant::now();
    observer.on_train_start("finetune", trainer.step_count(), steps);
    let validate = |trainer: &Trainer<Finetuning>,
                    state: &mut FinetuneState,
                    metrics_log: &mut crate::run_dir::MetricsLog,
                    observer: &mut dyn Observer|
     -> anyhow::Result<()> {
        let valid = trainer.model().valid();
        let e = evaluate(&valid, &batcher, &val_examples, cfg.batch_size, &device, &mut Quiet)?;
        observer.on_message(&format!(
            "step {}: validation {:?} {:.4} (n = {})",
            trainer.step_count(),
            e.metric,
            e.score,
            e.n
        ));
        metrics_log.write(&json!({"step": trainer.step_count(), "val": e}))?;
        if state.best.as_ref().is_none_or(|b| e.score > b.score) {
            save_task_model(&cfg.out.join("model"), &valid, &config, &classifier, &batcher)?;
            state.best = Some(e);
        }
        Ok(())
    };
    let (mut order, mut order_epoch) = (Vec::new(), None);
    while trainer.step_count() < steps {
        let step = trainer.step_count();
        let (epoch, k) = (step / per_epoch, step % per_epoch);
        // The epoch's order, shuffled once when the epoch starts (or the run resumes in it).
        if order_epoch != Some(epoch) {
            order = order_of(epoch);
            order_epoch = Some(epoch);
        }
        let idx = &order[k * cfg.batch_size..((k + 1) * cfg.batch_size).min(order.len())];
        let examples: Vec<&Example> = idx.iter().map(|&i| &train.examples[i]).collect();
        let t0 = Instant::now();
        let (batch, _) = match &cfg.augment {
            // Drawn from (seed, step): a resumed run augments each step as the first run did.
            Some(a) => {
                let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                batcher.augmented(&examples, &ad, a, &mut rng)?
            }
            None => batcher.batch(&examples, &ad)?,
        };
        let Some(batch) = batch else {
            anyhow::bail!(
                "step {}: no usable example in the batch (labels unknown or images unreadable)",
                step + 1
            );
        };
        let mut m = trainer.step(&batch, observer)?;
        if !m.updated && trainer.too_many_nonfinite() {
            let dir = run_dir.save_trainer(&trainer, &state, keep, observer)?;
            anyhow::bail!(
                "non-finite losses in a row at step {}: stopped and saved {}",
                step + 1,
                dir.display()
            );
        }
        m.step_time_s = t0.elapsed().as_secs_f64();
        state.train_seconds += m.step_time_s;
        metrics_log.write(&m.to_json())?;
        let step = trainer.step_count();
        if step.is_multiple_of(cfg.val_every) || step == steps {
            validate(&trainer, &mut state, &mut metrics_log, observer)?;
        }
        if step.is_multiple_of(cfg.checkpoint_every) && step < steps {
            run_dir.save_trainer(&trainer, &state, keep, observer)?;
        }
    }
    if state.best.is_none() {
        validate(&trainer, &mut state, &mut metrics_log, observer)?;
    }
    run_dir.finish(&trainer, &mut state, keep, &mut metrics_log, observer)?;
    let best = state
        .best
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no validation was run"))?;
    flava_vit::atomic::write_file(
        &cfg.out.join("eval.json"),
        serde_json::to_string_pretty(&best)?.as_bytes(),
    )?;
    match crate::report::write(&cfg.out) {
        Ok(p) => observer.on_message(&format!("report: {}", p.display())),
        Err(e) => observer.on_message(&format!("warning: report not written: {e:#}")),
    }
    Ok(FinetuneSummary {
        steps: trainer.step_count(),
        best,
        model_dir: cfg.out.join("model"),
        train_seconds: started.elapsed().as_secs_f64(),
    })
}
