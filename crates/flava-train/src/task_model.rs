//! A task model and what it is judged by, shared by `flava finetune`, `flava eval classify`
//! and `flava eval linear-probe`: the task's outputs ([`TaskHead`]), examples turned into
//! batches ([`Batcher`]), predictions ([`predict`] → [`Scored`]), the task's metrics
//! ([`TaskEval`], `eval.json`) and the model directory (`model/`: [`save_task_model`],
//! [`load_task_model`]).

use std::path::Path;

use anyhow::Context;
use burn::prelude::*;
use flava_data::processor::{load_image, to_rgb8, ImageProcessor};
use flava_data::tasks::{answer_vocabulary, vqa_score, Example, ImageRef, Metric, Target, TaskKind, TaskSet};
use flava_fusion::checkpoint::{find_weights, load_flava_model};
use flava_fusion::{FlavaConfig, FlavaInput, Tower};
use flava_objectives::{ClassifierConfig, FlavaForClassification, TaskTargets};
use flava_text::Tokenizer;
use flava_vit::weights::StateDict;
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::embed::{find_processor, find_tokenizer};
use crate::metrics;
use crate::observer::Observer;

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

    /// The tower whose CLS the task reads.
    pub fn tower(&self) -> Tower {
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

    /// Whether the outputs are classes (one of them is right), not answers or a value.
    pub fn is_classification(&self) -> bool {
        !matches!(self.metric, Metric::VqaAccuracy | Metric::Pearson)
    }
}

/// One batch: the model's input on a device and the targets.
#[derive(Debug, Clone)]
pub struct FinetuneBatch {
    /// Pixels and tokens.
    pub input: FlavaInput,
    /// What the head is trained against.
    pub targets: TaskTargets,
    /// Examples.
    pub size: usize,
    /// Per example: its id.
    pub ids: Vec<String>,
    /// Per example: whether it has a target (unlabelled ones are kept only for predictions).
    pub labelled: Vec<bool>,
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
    /// Keep examples without a target (predictions on a test split); training leaves them out.
    pub keep_unlabelled: bool,
}

/// Training-time image augmentation: a random-resized crop (torchvision's box, FLAVA's scale
/// and ratio by default) before the processor, and for image-only tasks a horizontal flip (not
/// for image + text, whose questions and captions say "left" and "right").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Range of the crop area as a share of the image (`[1, 1]` turns cropping off).
    pub scale: (f64, f64),
    /// Range of the crop aspect ratio.
    pub ratio: (f64, f64),
    /// Flip image-only examples with probability 0.5.
    pub hflip: bool,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            scale: (0.9, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
        }
    }
}

impl Augment {
    /// Values that would fail or make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        let (a, b) = self.scale;
        let (r0, r1) = self.ratio;
        if !(0.0 < a && a <= b && b <= 1.0 && 0.0 < r0 && r0 <= r1 && r1.is_finite()) {
            anyhow::bail!(
                "augment: scale must satisfy 0 < min <= max <= 1 and ratio 0 < min <= max, got {:?} and {:?}",
                self.scale,
                self.ratio
            );
        }
        Ok(())
    }

    fn apply(&self, img: DynamicImage, flip: bool, rng: &mut impl rand::Rng) -> DynamicImage {
        let rgb = img.to_rgb8();
        let b = flava_data::transforms::random_resized_crop_box(rgb.width(), rgb.height(), self.scale, self.ratio, rng);
        let mut crop = image::imageops::crop_imm(&rgb, b.left, b.top, b.width, b.height).to_image();
        if flip && self.hflip && rng.random::<bool>() {
            image::imageops::flip_horizontal_in_place(&mut crop);
        }
        DynamicImage::ImageRgb8(crop)
    }
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
    /// label is not one of the head's (or that has none, unless `keep_unlabelled`), is left
    /// out and counted in the second value.
    pub fn batch(&self, examples: &[&Example], device: &Device) -> anyhow::Result<(Option<FinetuneBatch>, usize)> {
        self.batch_with(examples, device, None::<(&Augment, &mut rand_chacha::ChaCha8Rng)>)
    }

    /// [`Batcher::batch`] with training augmentation drawn from `rng`.
    pub fn augmented(
        &self,
        examples: &[&Example],
        device: &Device,
        augment: &Augment,
        rng: &mut impl rand::Rng,
    ) -> anyhow::Result<(Option<FinetuneBatch>, usize)> {
        self.batch_with(examples, device, Some((augment, rng)))
    }

    fn batch_with(
        &self,
        examples: &[&Example],
        device: &Device,
        mut augment: Option<(&Augment, &mut impl rand::Rng)>,
    ) -> anyhow::Result<(Option<FinetuneBatch>, usize)> {
        let flip = self.head.kind == TaskKind::Image;
        let needs_image = matches!(self.head.kind, TaskKind::Image | TaskKind::Multimodal);
        let needs_text = matches!(self.head.kind, TaskKind::Text | TaskKind::Multimodal);
        let c = self.head.outputs();
        let (mut images, mut texts, mut gold, mut soft, mut values) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut ids, mut labelled) = (vec![], vec![]);
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
                None if self.keep_unlabelled => (0, vec![0.0; c], 0.0),
                None => {
                    skipped += 1;
                    continue;
                }
            };
            let img = if needs_image {
                match Self::image(e) {
                    Ok(i) => Some(match augment.as_mut() {
                        Some((a, rng)) => a.apply(i, flip, rng),
                        None => i,
                    }),
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
            ids.push(e.id.clone());
            labelled.push(e.target.is_some());
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
                ids,
                labelled,
                soft,
                gold,
                values,
            }),
            skipped,
        ))
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
    /// Top-5 accuracy (classification tasks with more than five classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5: Option<f64>,
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
    /// Examples scored (those with a target).
    pub n: usize,
    /// Examples left out (unreadable image, unknown label).
    pub skipped: usize,
}

/// The model's outputs on a set of examples, with what the metrics need.
#[derive(Debug, Clone, Default)]
pub struct Scored {
    /// Outputs per example.
    pub outputs: usize,
    /// Per example: its id.
    pub ids: Vec<String>,
    /// Logits, row-major [n, outputs].
    pub logits: Vec<f32>,
    /// Per example: whether it has a target.
    pub labelled: Vec<bool>,
    /// Per example: the gold class (classification).
    pub gold: Vec<usize>,
    /// Per example: soft scores per output (VQA).
    pub soft: Vec<Vec<f32>>,
    /// Per example: the value (regression).
    pub values: Vec<f32>,
    /// Examples left out.
    pub skipped: usize,
}

/// One line of `--predictions`: the example, the predicted label (classes), answer (VQA) or
/// value (regression), and its probability (softmax over the classes; sigmoid of the answer's
/// logit) or the value itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The example's id.
    pub id: String,
    /// The predicted class name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The predicted answer (VQA).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The predicted value (regression).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f32>,
    /// Probability of the prediction (or the value).
    pub score: f32,
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).max_by(|&i, &j| row[i].total_cmp(&row[j])).unwrap_or(0)
}

impl Scored {
    /// Adds a batch's logits ([b, outputs] row-major) and targets.
    pub fn push(&mut self, batch: &FinetuneBatch, logits: &[f32]) {
        self.logits.extend_from_slice(logits);
        self.ids.extend(batch.ids.iter().cloned());
        self.labelled.extend(&batch.labelled);
        self.gold.extend(&batch.gold);
        self.soft.extend(batch.soft.iter().cloned());
        self.values.extend(&batch.values);
    }

    fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.logits.chunks(self.outputs.max(1))
    }

    /// The task's metrics over the labelled examples.
    pub fn eval(&self, head: &TaskHead) -> TaskEval {
        let c = head.outputs();
        let keep: Vec<usize> = (0..self.labelled.len()).filter(|&i| self.labelled[i]).collect();
        let rows: Vec<&[f32]> = self.rows().collect();
        let pred: Vec<usize> = keep.iter().map(|&i| argmax(rows[i])).collect();
        let gold: Vec<usize> = keep.iter().map(|&i| self.gold[i]).collect();
        let mut e = TaskEval {
            task: head.task.clone(),
            metric: head.metric,
            score: 0.0,
            accuracy: None,
            top5: None,
            vqa_accuracy: None,
            auroc: None,
            f1: None,
            matthews: None,
            pearson: None,
            mean_per_class_recall: None,
            n: keep.len(),
            skipped: self.skipped,
        };
        if keep.is_empty() {
            return e;
        }
        match head.metric {
            Metric::VqaAccuracy => {
                let soft: Vec<Vec<f32>> = keep.iter().map(|&i| self.soft[i].clone()).collect();
                e.vqa_accuracy = Some(metrics::vqa_accuracy(&pred, &soft));
            }
            Metric::Pearson => {
                let out: Vec<f32> = keep.iter().map(|&i| rows[i][0]).collect();
                let values: Vec<f32> = keep.iter().map(|&i| self.values[i]).collect();
                e.pearson = Some(metrics::pearson(&out, &values));
            }
            _ => {
                e.accuracy = Some(metrics::accuracy(&pred, &gold));
                e.mean_per_class_recall = Some(metrics::mean_per_class_recall(&pred, &gold, c));
                if c > 5 {
                    let flat: Vec<f32> = keep.iter().flat_map(|&i| rows[i].iter().copied()).collect();
                    e.top5 = Some(metrics::top_k(&flat, c, &gold, 5));
                }
                if c == 2 {
                    // P(class 1): softmax of the two logits.
                    let pos: Vec<f32> = keep
                        .iter()
                        .map(|&i| 1.0 / (1.0 + (rows[i][0] - rows[i][1]).exp()))
                        .collect();
                    e.f1 = Some(metrics::f1(&pred, &gold));
                    e.matthews = Some(metrics::matthews(&pred, &gold));
                    e.auroc = Some(metrics::auroc(&pos, &gold));
                }
            }
        }
        e.score = match head.metric {
            Metric::Accuracy => e.accuracy,
            Metric::VqaAccuracy => e.vqa_accuracy,
            Metric::F1 => e.f1,
            Metric::Auroc => e.auroc,
            Metric::Pearson => e.pearson,
            Metric::Matthews => e.matthews,
        }
        .unwrap_or(0.0);
        e
    }

    /// One prediction per example (labelled or not).
    pub fn predictions(&self, head: &TaskHead) -> Vec<Prediction> {
        self.rows()
            .zip(&self.ids)
            .map(|(row, id)| {
                let best = argmax(row);
                let name = head.labels.get(best).cloned();
                let mut p = Prediction {
                    id: id.clone(),
                    label: None,
                    answer: None,
                    value: None,
                    score: 0.0,
                };
                match head.metric {
                    Metric::Pearson => {
                        p.value = Some(row[0]);
                        p.score = row[0];
                    }
                    Metric::VqaAccuracy => {
                        p.answer = name;
                        p.score = 1.0 / (1.0 + (-row[best]).exp());
                    }
                    _ => {
                        p.label = name;
                        let z: f32 = row.iter().map(|x| (x - row[best]).exp()).sum();
                        p.score = 1.0 / z;
                    }
                }
                p
            })
            .collect()
    }
}

/// The outputs of `model` (on a device without autodiff) on `examples`, in batches of
/// `batch_size`; progress as `on_progress("predict", done, total)`.
pub fn predict(
    model: &FlavaForClassification,
    batcher: &Batcher,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
    observer: &mut dyn Observer,
) -> anyhow::Result<Scored> {
    let mut scored = Scored {
        outputs: batcher.head.outputs(),
        ..Default::default()
    };
    let refs: Vec<&Example> = examples.iter().collect();
    let mut done = 0;
    for chunk in refs.chunks(batch_size.max(1)) {
        let (b, s) = batcher.batch(chunk, device)?;
        scored.skipped += s;
        done += chunk.len();
        observer.on_progress("predict", done, refs.len());
        let Some(b) = b else { continue };
        let logits = model.forward(b.input.clone())?;
        let host: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading logits: {e:?}"))?;
        scored.push(&b, &host);
    }
    Ok(scored)
}

/// Scores `model` (on a device without autodiff) on `examples`: [`predict`], then the metrics.
pub fn evaluate(
    model: &FlavaForClassification,
    batcher: &Batcher,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
    observer: &mut dyn Observer,
) -> anyhow::Result<TaskEval> {
    Ok(predict(model, batcher, examples, batch_size, device, observer)?.eval(&batcher.head))
}

/// Writes a task model directory: `config.json` (the backbone's FLAVA config with the head,
/// the task and `id2label`), `model.safetensors` (HF backbone keys and `classifier.model.*`),
/// the tokenizer and `preprocessor_config.json`; atomically (a half-written directory is never
/// left in place).
pub fn save_task_model(
    dir: &Path,
    model: &FlavaForClassification,
    config: &FlavaConfig,
    classifier: &ClassifierConfig,
    batcher: &Batcher,
) -> anyhow::Result<()> {
    let head = &batcher.head;
    let staged = flava_vit::atomic::AtomicDir::new(dir)?;
    let d = staged.path();
    let mut cfg: serde_json::Value = serde_json::from_str(&config.to_json_pretty("FlavaForClassification"))?;
    cfg["classifier"] = serde_json::to_value(classifier)?;
    cfg["task"] = serde_json::to_value(head)?;
    cfg["task_max_length"] = json!(batcher.max_length);
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

/// A task model read back from its directory.
pub struct TaskModel {
    /// The backbone with its head.
    pub model: FlavaForClassification,
    /// The backbone's configuration.
    pub config: FlavaConfig,
    /// The head's shape.
    pub classifier: ClassifierConfig,
    /// Examples to batches (the head's labels, the directory's tokenizer and processor).
    pub batcher: Batcher,
}

/// Loads what [`save_task_model`] wrote (`flava finetune`'s or `flava eval linear-probe`'s
/// `model/`). A directory without a task head (a plain FLAVA model) is an error saying so.
pub fn load_task_model(dir: &Path, device: &Device) -> anyhow::Result<TaskModel> {
    let dir = &crate::hub::resolve(dir).context("--model")?;
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if cfg.get("classifier").is_none() || cfg.get("task").is_none() {
        anyhow::bail!(
            "{} has no task head (`classifier` and `task` in config.json): give a directory written by \
             `flava finetune` or `flava eval linear-probe`",
            dir.display()
        );
    }
    let classifier: ClassifierConfig = serde_json::from_value(cfg["classifier"].clone())
        .with_context(|| format!("{}: `classifier`", path.display()))?;
    let head: TaskHead =
        serde_json::from_value(cfg["task"].clone()).with_context(|| format!("{}: `task`", path.display()))?;
    if classifier.num_classes != head.outputs() {
        anyhow::bail!(
            "{}: the head has {} outputs but the task names {}",
            path.display(),
            classifier.num_classes,
            head.outputs()
        );
    }
    let loaded = load_flava_model(dir, device).with_context(|| format!("loading {}", dir.display()))?;
    let mut model = FlavaForClassification::new(loaded.model, &loaded.config, &classifier, device);
    let weights = find_weights(dir)?;
    let sd = StateDict::from_file(&weights).with_context(|| format!("reading {}", weights.display()))?;
    let (_, head_report) = model.load_state_dict(&sd)?;
    if !head_report.missing.is_empty() {
        anyhow::bail!(
            "{}: the head's weights are missing ({})",
            dir.display(),
            head_report.missing.join(", ")
        );
    }
    let max_length = cfg["task_max_length"]
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(crate::eval_cmd::EVAL_MAX_LENGTH)
        .min(loaded.config.text_config.max_position_embeddings);
    Ok(TaskModel {
        model,
        config: loaded.config,
        classifier,
        batcher: Batcher {
            head,
            tokenizer: find_tokenizer(dir)?,
            processor: find_processor(dir)?,
            max_length,
            keep_unlabelled: true,
        },
    })
}
