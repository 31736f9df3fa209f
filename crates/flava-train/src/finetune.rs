//! Fine-tuning FLAVA on a downstream task (`flava finetune`): a task head
//! ([`FlavaForClassification`]) on the CLS of the encoder the task reads, trained with the
//! workspace's [`Trainer`] (optimizer groups, schedule, clipping, non-finite guard), validated
//! every `val_every` steps, the best model by the task's metric kept in `model/`.
//!
//! Run directory (`--out`): `config.toml`, `checkpoints/step-N/`, `metrics.jsonl` (one line
//! per step, and `{"val": …}` lines), `model/` (`config.json` with the head and the label names,
//! `model.safetensors` with HF backbone keys and `classifier.model.{0,3}.*`, the tokenizer and
//! `preprocessor_config.json`; `flava eval` and `flava embed` load it as a `FlavaModel`),
//! `eval.json` (`{"task", "metric", "accuracy", … "n"}` of the best validation).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::prelude::*;
use flava_data::processor::{load_image, to_rgb8, ImageProcessor, ImageProcessorConfig};
use flava_data::tasks::{
    answer_vocabulary, open_task, vqa_score, Example, ImageRef, Metric, Target, TaskKind, TaskOptions, TaskSet,
};
use flava_fusion::checkpoint::load_flava_model;
use flava_fusion::{FlavaConfig, FlavaInput, FlavaModel, Tower};
use flava_objectives::{ClassifierConfig, FlavaForClassification, TaskTargets};
use flava_text::Tokenizer;
use image::DynamicImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::metrics;
use crate::observer::Observer;
use crate::optim::OptimizerConfig;
use crate::run_dir::{RunDir, RunState};
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
    /// Validation data spec; `None` holds out 10% of the training data.
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
    /// Head hidden width and dropout.
    pub head_hidden: usize,
    /// Dropout of the head.
    pub head_dropout: f64,
    /// Model sizes with `--init none`.
    pub preset: String,
    /// Synthetic set sizes (`synthetic:vqa` etc.).
    pub synthetic_len: usize,
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
            val: Some("synthetic:vqa:heldout".into()),
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
        if self.max_length < 2 || self.num_answers == 0 || self.head_hidden == 0 {
            anyhow::bail!("max_length must be at least 2, num_answers and head_hidden at least 1");
        }
        Ok(())
    }
}

/// The task's outputs: class names (or answers), or one value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskHead {
    /// Task name (`vqa`, `sst2`, ...).
    pub task: String,
    /// Its metric.
    pub metric: Metric,
    /// The encoder read.
    pub kind: TaskKind,
    /// Output names in index order (empty for regression).
    pub labels: Vec<String>,
}

impl TaskHead {
    /// Outputs of the head.
    pub fn outputs(&self) -> usize {
        self.labels.len().max(1)
    }

    fn tower(&self) -> Tower {
        match self.kind {
            TaskKind::Image => Tower::Image,
            TaskKind::Text => Tower::Text,
            TaskKind::Multimodal => Tower::Multimodal,
        }
    }

    /// The head for a training set: its fixed labels, the top answers (VQA), the sorted labels
    /// seen, or one output for values.
    pub fn of(train: &TaskSet, num_answers: usize) -> anyhow::Result<Self> {
        let first = train.examples.iter().find_map(|e| e.target.as_ref());
        let labels = match (first, &train.labels) {
            (None, _) => anyhow::bail!("{}: no example has a label", train.spec),
            (Some(Target::Value(_)), _) => vec![],
            (Some(Target::Answers(_)), _) => answer_vocabulary(&train.examples, num_answers),
            (_, Some(l)) => l.clone(),
            (Some(Target::Label(_)), None) => {
                let mut l: Vec<String> = train
                    .examples
                    .iter()
                    .filter_map(|e| match &e.target {
                        Some(Target::Label(l)) => Some(l.clone()),
                        _ => None,
                    })
                    .collect();
                l.sort();
                l.dedup();
                l
            }
        };
        let metric = match (train.metric, first) {
            (Metric::Accuracy, Some(Target::Answers(_))) => Metric::VqaAccuracy,
            (Metric::Accuracy, Some(Target::Value(_))) => Metric::Pearson,
            (m, _) => m,
        };
        Ok(Self {
            task: train.task.clone(),
            metric,
            kind: train.kind,
            labels,
        })
    }
}

/// One batch: the model's input on the training device and the targets.
#[derive(Debug, Clone)]
pub struct FinetuneBatch {
    /// Pixels and tokens.
    pub input: FlavaInput,
    /// What the head is trained against.
    pub targets: TaskTargets,
    /// Examples.
    pub size: usize,
    /// Per example: the soft score of every output (VQA) for the metric.
    pub soft: Vec<Vec<f32>>,
    /// Per example: the gold output (classes), for the metric.
    pub gold: Vec<usize>,
    /// Per example: the value (regression).
    pub values: Vec<f32>,
}

/// Turns examples into batches: images through the model's processor, texts (and pairs)
/// through its tokenizer, targets against the head's outputs.
pub struct Batcher {
    /// The head's outputs.
    pub head: TaskHead,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The image processor (the checkpoint's own configuration).
    pub processor: ImageProcessor,
    /// Text length.
    pub max_length: usize,
}

impl Batcher {
    fn image(e: &Example) -> anyhow::Result<DynamicImage> {
        match &e.image {
            Some(ImageRef::Pixels(p)) => Ok(DynamicImage::ImageRgb8(p.clone())),
            Some(ImageRef::File(path)) => Ok(DynamicImage::ImageRgb8(to_rgb8(&load_image(path)?))),
            None => anyhow::bail!("{}: no image", e.id),
        }
    }

    /// The batch of `examples` on `device`; an example whose image cannot be read, or whose
    /// label is not one of the head's, is left out and counted in the second value.
    pub fn batch(&self, examples: &[&Example], device: &Device) -> anyhow::Result<(Option<FinetuneBatch>, usize)> {
        let needs_image = matches!(self.head.kind, TaskKind::Image | TaskKind::Multimodal);
        let needs_text = matches!(self.head.kind, TaskKind::Text | TaskKind::Multimodal);
        let c = self.head.outputs();
        let (mut images, mut texts, mut gold, mut soft, mut values) = (vec![], vec![], vec![], vec![], vec![]);
        let mut skipped = 0;
        for e in examples {
            let target = match &e.target {
                Some(Target::Label(l)) => match self.head.labels.iter().position(|x| x == l) {
                    Some(i) => (i, vec![], 0.0),
                    None => {
                        skipped += 1;
                        continue;
                    }
                },
                Some(Target::Answers(a)) => {
                    let s: Vec<f32> = self.head.labels.iter().map(|x| vqa_score(x, a)).collect();
                    let best = (0..c).max_by(|&i, &j| s[i].total_cmp(&s[j])).unwrap_or(0);
                    (best, s, 0.0)
                }
                Some(Target::Value(v)) => (0, vec![], *v),
                None => {
                    skipped += 1;
                    continue;
                }
            };
            let img = if needs_image {
                match Self::image(e) {
                    Ok(i) => Some(i),
                    Err(err) => {
                        log::warn!("skipped {}: {err:#}", e.id);
                        skipped += 1;
                        continue;
                    }
                }
            } else {
                None
            };
            images.extend(img);
            texts.push((e.text.clone().unwrap_or_default(), e.text_pair.clone()));
            gold.push(target.0);
            soft.push(target.1);
            values.push(target.2);
        }
        let n = gold.len();
        if n == 0 {
            return Ok((None, skipped));
        }
        let mut input = FlavaInput::default();
        if needs_image {
            input.pixel_values = Some(self.processor.pixel_values(&images, device));
        }
        if needs_text {
            let pairs: Vec<(&str, Option<&str>)> = texts.iter().map(|(a, b)| (a.as_str(), b.as_deref())).collect();
            let enc = self.tokenizer.encode_pairs(&pairs, self.max_length)?;
            let (ids, mask, types) = enc.to_tensors(device);
            input.input_ids = Some(ids);
            input.attention_mask = Some(mask);
            input.token_type_ids = Some(types);
        }
        let targets = match self.head.metric {
            Metric::VqaAccuracy => TaskTargets::Soft(soft.iter().flatten().copied().collect()),
            Metric::Pearson => TaskTargets::Values(values.clone()),
            _ => TaskTargets::Classes(gold.clone()),
        };
        Ok((
            Some(FinetuneBatch {
                input,
                targets,
                size: n,
                soft,
                gold,
                values,
            }),
            skipped,
        ))
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

/// A task's evaluation (`eval.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEval {
    /// Task name.
    pub task: String,
    /// The metric that chooses the best model.
    pub metric: Metric,
    /// Its value.
    pub score: f64,
    /// Top-1 accuracy (classification tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// VQA accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vqa_accuracy: Option<f64>,
    /// AUROC of class 1 (binary tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auroc: Option<f64>,
    /// F1 of class 1 (binary tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f1: Option<f64>,
    /// Matthews correlation (binary tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matthews: Option<f64>,
    /// Pearson correlation (regression).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pearson: Option<f64>,
    /// Mean per-class recall (classification tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_per_class_recall: Option<f64>,
    /// Examples scored.
    pub n: usize,
    /// Examples left out (unreadable image, unknown label).
    pub skipped: usize,
}

/// Scores `model` (on a device without autodiff) on `examples`, in batches of `batch_size`.
pub fn evaluate(
    model: &FlavaForClassification,
    batcher: &Batcher,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<TaskEval> {
    let c = batcher.head.outputs();
    let (mut pred, mut gold, mut soft, mut values, mut out, mut pos) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut skipped = 0;
    let refs: Vec<&Example> = examples.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let (b, s) = batcher.batch(chunk, device)?;
        skipped += s;
        let Some(b) = b else { continue };
        let logits = model.forward(b.input.clone())?;
        let host: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        for row in host.chunks(c) {
            let best = (0..row.len()).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap_or(0);
            pred.push(best);
            out.push(row[0]);
            // P(class 1) for binary tasks: softmax of the two logits.
            if row.len() == 2 {
                pos.push(1.0 / (1.0 + (row[0] - row[1]).exp()));
            }
        }
        gold.extend(b.gold);
        soft.extend(b.soft);
        values.extend(b.values);
    }
    let n = pred.len();
    let h = &batcher.head;
    let mut e = TaskEval {
        task: h.task.clone(),
        metric: h.metric,
        score: 0.0,
        accuracy: None,
        vqa_accuracy: None,
        auroc: None,
        f1: None,
        matthews: None,
        pearson: None,
        mean_per_class_recall: None,
        n,
        skipped,
    };
    match h.metric {
        Metric::VqaAccuracy => e.vqa_accuracy = Some(metrics::vqa_accuracy(&pred, &soft)),
        Metric::Pearson => e.pearson = Some(metrics::pearson(&out, &values)),
        _ => {
            e.accuracy = Some(metrics::accuracy(&pred, &gold));
            e.mean_per_class_recall = Some(metrics::mean_per_class_recall(&pred, &gold, c));
            if c == 2 {
                e.f1 = Some(metrics::f1(&pred, &gold));
                e.matthews = Some(metrics::matthews(&pred, &gold));
                e.auroc = Some(metrics::auroc(&pos, &gold));
            }
        }
    }
    e.score = match h.metric {
        Metric::Accuracy => e.accuracy,
        Metric::VqaAccuracy => e.vqa_accuracy,
        Metric::F1 => e.f1,
        Metric::Auroc => e.auroc,
        Metric::Pearson => e.pearson,
        Metric::Matthews => e.matthews,
    }
    .unwrap_or(0.0);
    Ok(e)
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
        let dir = Path::new(&cfg.init);
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

/// Writes `model/`: config (with the head and its labels), weights, tokenizer, processor.
fn save_model(
    dir: &Path,
    model: &FlavaForClassification,
    config: &FlavaConfig,
    head: &TaskHead,
    classifier: &ClassifierConfig,
    batcher: &Batcher,
) -> anyhow::Result<()> {
    let staged = flava_vit::atomic::AtomicDir::new(dir)?;
    let d = staged.path();
    let mut cfg: serde_json::Value = serde_json::from_str(&config.to_json_pretty("FlavaForClassification"))?;
    cfg["classifier"] = serde_json::to_value(classifier)?;
    cfg["task"] = serde_json::to_value(head)?;
    cfg["id2label"] = json!(head
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect::<serde_json::Map<_, _>>());
    std::fs::write(d.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    model.state_dict().save_safetensors(d.join("model.safetensors"))?;
    batcher
        .tokenizer
        .inner()
        .save(d.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("writing the tokenizer: {e}"))?;
    let mut p = serde_json::to_value(&batcher.processor.config)?;
    p["image_processor_type"] = json!("FlavaImageProcessor");
    std::fs::write(d.join("preprocessor_config.json"), serde_json::to_string_pretty(&p)?)?;
    staged.commit()?;
    Ok(())
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
    let val_examples = match &cfg.val {
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
        let e = evaluate(&valid, &batcher, &val_examples, cfg.batch_size, &device)?;
        observer.on_message(&format!(
            "step {}: validation {:?} {:.4} (n = {})",
            trainer.step_count(),
            e.metric,
            e.score,
            e.n
        ));
        metrics_log.write(&json!({"step": trainer.step_count(), "val": e}))?;
        if state.best.as_ref().is_none_or(|b| e.score > b.score) {
            save_model(&cfg.out.join("model"), &valid, &config, &head, &classifier, &batcher)?;
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
        let (batch, _) = batcher.batch(&examples, &ad)?;
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
    Ok(FinetuneSummary {
        steps: trainer.step_count(),
        best,
        model_dir: cfg.out.join("model"),
        train_seconds: started.elapsed().as_secs_f64(),
    })
}
