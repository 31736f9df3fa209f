//! `flava eval linear-probe`: FLAVA's linear evaluation (the paper's protocol, as CLIP's). The
//! CLS of an encoder's `last_hidden_state` is a fixed feature, extracted once per split and
//! cached (safetensors: `features` [n, d] f32, `labels` `[n]` i64, a fingerprint of the model
//! and the data in the metadata); a multinomial logistic regression is fitted full-batch with
//! L-BFGS (linfa-logistic on argmin); its L2 strength is chosen by validation accuracy over a
//! log grid, then refined; the probe is refitted on train + val. Reported: top-1, top-5 and mean
//! per-class recall, and the strength. The probe is saved as a linear task head
//! (`classifier.model.0.*` beside the backbone) that `flava eval classify` loads.
//!
//! The objective is scikit-learn's `LogisticRegression(C)` (lbfgs, multinomial): the summed
//! cross-entropy plus `strength / 2 · ‖W‖²`, the intercept not penalised, `strength = 1 / C`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Param;
use burn::prelude::*;
use flava_data::tasks::{open_task, Example, TaskOptions};
use flava_fusion::checkpoint::{find_weights, load_flava_model};
use flava_fusion::{FlavaConfig, FlavaModel, Tower};
use flava_objectives::{cls_features, ClassifierConfig, FlavaForClassification};
use linfa::traits::Fit;
use linfa::DatasetBase;
use ndarray::{Array1, Array2};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::embed::{find_processor, find_tokenizer};
use crate::observer::Observer;
use crate::task_model::{save_task_model, Batcher, Scored, TaskEval, TaskHead};

/// The options of a linear probe (`flava eval linear-probe`).
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// The model directory whose features are probed.
    pub model: PathBuf,
    /// Training data spec ([`flava_data::tasks`]).
    pub train: String,
    /// Validation data spec (chooses the strength).
    pub val: String,
    /// Test data spec, scored with the probe refitted on train + val.
    pub test: Option<String>,
    /// The encoder whose CLS is the feature; by default the one the task reads.
    pub feature: Option<Tower>,
    /// Training examples kept per class (few-shot); all by default.
    pub fewshot_k: Option<usize>,
    /// Where the feature files go (and are reused from); default `out/features`.
    pub features_dir: Option<PathBuf>,
    /// Output directory: `model/` (the probe as a task head) and `probe.json`.
    pub out: PathBuf,
    /// Examples per forward pass while extracting features.
    pub batch_size: usize,
    /// L-BFGS iterations per fit.
    pub max_iter: u64,
    /// Synthetic set sizes (`synthetic:classes` etc.).
    pub synthetic_len: usize,
    /// Seed of the synthetic sets and of the few-shot choice.
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::from("runs/flava/model"),
            train: "synthetic:classes".into(),
            val: "synthetic:classes:heldout".into(),
            test: None,
            feature: None,
            fewshot_k: None,
            features_dir: None,
            out: PathBuf::from("runs/linear-probe"),
            batch_size: 32,
            max_iter: 1000,
            synthetic_len: 2000,
            seed: 0,
        }
    }
}

/// One split's features: CLS rows and class indices.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Features {
    /// Row-major [n, dim].
    pub features: Vec<f32>,
    /// Feature width.
    pub dim: usize,
    /// Class index per row.
    pub labels: Vec<usize>,
}

impl Features {
    /// Rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows of `self` then `other` (train + val for the refit).
    pub fn concat(&self, other: &Features) -> Features {
        let mut f = self.clone();
        f.features.extend_from_slice(&other.features);
        f.labels.extend_from_slice(&other.labels);
        f
    }

    /// At most `k` rows per class, chosen by `seed` (every class keeps all its rows when it has
    /// fewer); rows keep their order.
    pub fn fewshot(&self, k: usize, seed: u64) -> Features {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut taken: HashMap<usize, usize> = HashMap::new();
        let mut keep: Vec<usize> = idx
            .into_iter()
            .filter(|&i| {
                let n = taken.entry(self.labels[i]).or_default();
                *n += 1;
                *n <= k
            })
            .collect();
        keep.sort_unstable();
        Features {
            features: keep.iter().flat_map(|&i| self.row(i).iter().copied()).collect(),
            dim: self.dim,
            labels: keep.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// Writes `path` (safetensors: `features` [n, dim] f32, `labels` `[n]` i64) with `metadata`.
    pub fn save(&self, path: &Path, metadata: HashMap<String, String>) -> anyhow::Result<()> {
        use safetensors::tensor::TensorView;
        let f: Vec<u8> = self.features.iter().flat_map(|v| v.to_le_bytes()).collect();
        let l: Vec<u8> = self.labels.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect();
        let views = vec![
            (
                "features",
                TensorView::new(safetensors::Dtype::F32, vec![self.len(), self.dim], &f)?,
            ),
            (
                "labels",
                TensorView::new(safetensors::Dtype::I64, vec![self.len()], &l)?,
            ),
        ];
        let bytes = safetensors::serialize(views, Some(metadata))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        flava_vit::atomic::write_file(path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Reads what [`Features::save`] wrote, with its metadata; any other layout is an error.
    pub fn load(path: &Path) -> anyhow::Result<(Features, HashMap<String, String>)> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let f = st
            .tensor("features")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let l = st
            .tensor("labels")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let (&[n, dim], &[m]) = (f.shape(), l.shape()) else {
            anyhow::bail!("{}: features must be [n, d] and labels [n]", path.display());
        };
        if f.dtype() != safetensors::Dtype::F32 || l.dtype() != safetensors::Dtype::I64 || n != m {
            anyhow::bail!(
                "{}: expected f32 features [n, d] and i64 labels [n], got {:?} {:?} and {:?} {:?}",
                path.display(),
                f.dtype(),
                f.shape(),
                l.dtype(),
                l.shape()
            );
        }
        let features = f
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let labels = l
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .map(|v| usize::try_from(v).map_err(|_| anyhow::anyhow!("{}: negative label {v}", path.display())))
            .collect::<anyhow::Result<Vec<usize>>>()?;
        Ok((
            Features { features, dim, labels },
            meta.metadata().clone().unwrap_or_default(),
        ))
    }

    fn matrix(&self) -> Array2<f64> {
        Array2::from_shape_fn((self.len(), self.dim), |(i, j)| {
            f64::from(self.features[i * self.dim + j])
        })
    }
}

/// A fitted probe: `logits = x · weight + bias`.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// Row-major [dim, classes].
    pub weight: Vec<f32>,
    /// `[classes]`.
    pub bias: Vec<f32>,
    /// Feature width.
    pub dim: usize,
    /// Outputs.
    pub classes: usize,
    /// The L2 strength it was fitted with.
    pub strength: f64,
}

/// The logit given to a class that no training row had (never predicted).
const ABSENT_CLASS_LOGIT: f32 = -1e4;

impl Probe {
    /// Logits of every row, row-major [n, classes].
    pub fn logits(&self, x: &Features) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len() * self.classes);
        for i in 0..x.len() {
            let row = x.row(i);
            for c in 0..self.classes {
                let dot: f32 = (0..self.dim).map(|j| row[j] * self.weight[j * self.classes + c]).sum();
                out.push(dot + self.bias[c]);
            }
        }
        out
    }

    /// Top-1 accuracy on `x`.
    pub fn accuracy(&self, x: &Features) -> f64 {
        let logits = self.logits(x);
        let pred: Vec<usize> = logits
            .chunks(self.classes)
            .map(|r| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap_or(0))
            .collect();
        crate::metrics::accuracy(&pred, &x.labels)
    }
}

/// Fits the multinomial logistic regression on `train` (classes `0..classes`) with L2
/// `strength`, L-BFGS for at most `max_iter` iterations.
pub fn fit(train: &Features, classes: usize, strength: f64, max_iter: u64) -> anyhow::Result<Probe> {
    if train.is_empty() || train.dim == 0 {
        anyhow::bail!("no training features");
    }
    if let Some(l) = train.labels.iter().find(|&&l| l >= classes) {
        anyhow::bail!("label {l} is not below the {classes} classes");
    }
    let present: std::collections::BTreeSet<usize> = train.labels.iter().copied().collect();
    if present.len() < 2 {
        anyhow::bail!(
            "the training features hold {} class(es); a probe needs two",
            present.len()
        );
    }
    let data = DatasetBase::new(train.matrix(), Array1::from(train.labels.clone()));
    let fitted = linfa_logistic::MultiLogisticRegression::default()
        .alpha(strength)
        .max_iterations(max_iter)
        .gradient_tolerance(1e-6)
        .fit(&data)
        .map_err(|e| anyhow::anyhow!("fitting the probe (strength {strength:e}): {e}"))?;
    let (w, b) = (fitted.params(), fitted.intercept());
    let mut weight = vec![0.0f32; train.dim * classes];
    let mut bias = vec![ABSENT_CLASS_LOGIT; classes];
    for (col, &class) in fitted.classes().iter().enumerate() {
        bias[class] = b[col] as f32;
        for j in 0..train.dim {
            weight[j * classes + class] = w[[j, col]] as f32;
        }
    }
    Ok(Probe {
        weight,
        bias,
        dim: train.dim,
        classes,
        strength,
    })
}

/// The strengths tried, in order, with their validation accuracy, and the one chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// (strength, validation top-1) in the order tried.
    pub tried: Vec<(f64, f64)>,
    /// The strength with the best validation accuracy (the first one tried on ties).
    pub best: f64,
}

/// The coarse grid: 1e-6 … 1e6 every two decades.
pub const COARSE_GRID: [f64; 7] = [1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6];

/// Chooses the strength on `val`: the [`COARSE_GRID`], then a decade either side of the best,
/// then half a decade either side of the new best.
pub fn sweep(
    train: &Features,
    val: &Features,
    classes: usize,
    max_iter: u64,
    observer: &mut dyn Observer,
) -> anyhow::Result<Sweep> {
    let mut tried: Vec<(f64, f64)> = vec![];
    let mut best = (f64::NAN, f64::NEG_INFINITY);
    let try_one = |s: f64, tried: &mut Vec<(f64, f64)>, best: &mut (f64, f64)| -> anyhow::Result<()> {
        if tried.iter().any(|(t, _)| (t / s - 1.0).abs() < 1e-9) {
            return Ok(());
        }
        let acc = fit(train, classes, s, max_iter)?.accuracy(val);
        tried.push((s, acc));
        if acc > best.1 {
            *best = (s, acc);
        }
        Ok(())
    };
    let total = COARSE_GRID.len() + 4;
    for (i, s) in COARSE_GRID.iter().enumerate() {
        try_one(*s, &mut tried, &mut best)?;
        observer.on_progress("probe strengths", i + 1, total);
    }
    for step in [1.0f64, 0.5] {
        let centre = best.0;
        for s in [centre * 10f64.powf(-step), centre * 10f64.powf(step)] {
            try_one(s, &mut tried, &mut best)?;
        }
        observer.on_progress("probe strengths", total - if step == 1.0 { 2 } else { 0 }, total);
    }
    Ok(Sweep { tried, best: best.0 })
}

/// What a linear probe measured (`probe.json`).
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// The encoder probed.
    pub feature: Tower,
    /// Feature width.
    pub dim: usize,
    /// The chosen L2 strength (scikit-learn's `C` is its inverse).
    pub strength: f64,
    /// Every strength tried.
    pub sweep: Sweep,
    /// Validation metrics of the probe fitted on train at the chosen strength.
    pub val: TaskEval,
    /// Test metrics of the probe refitted on train + val.
    pub test: Option<TaskEval>,
    /// Training rows (after few-shot selection).
    pub n_train: usize,
    /// The probe as a task model.
    pub model_dir: PathBuf,
    /// Feature files reused from an earlier run (split names).
    pub reused: Vec<String>,
}

/// What identifies a split's features: the model's weights and configuration, the encoder,
/// the text length and image processing, the spec and every example's id and label.
fn fingerprint(
    model_dir: &Path,
    tower: Tower,
    batcher: &Batcher,
    spec: &str,
    examples: &[Example],
) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    let weights = find_weights(model_dir)?;
    let meta = std::fs::metadata(&weights)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(format!(
        "{}|{}|{modified}|",
        weights.canonicalize()?.display(),
        meta.len()
    ));
    h.update(std::fs::read(model_dir.join("config.json")).unwrap_or_default());
    h.update(format!(
        "|{tower}|{}|{}|{spec}|",
        batcher.max_length,
        serde_json::to_string(&batcher.processor.config)?
    ));
    for e in examples {
        h.update(format!("{}\u{1f}{:?}\u{1e}", e.id, e.target));
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The CLS features of `examples` (rows the batcher cannot use are left out), on `device`.
fn extract(
    flava: &FlavaModel,
    tower: Tower,
    batcher: &Batcher,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(Features, usize)> {
    let mut out = Features::default();
    let mut skipped = 0;
    let refs: Vec<&Example> = examples.iter().collect();
    let mut done = 0;
    for chunk in refs.chunks(batch_size.max(1)) {
        let (b, s) = batcher.batch(chunk, device)?;
        skipped += s;
        done += chunk.len();
        progress(done, refs.len());
        let Some(b) = b else { continue };
        let f = cls_features(flava, tower, b.input)?;
        out.dim = f.dims()[1];
        out.features.extend(
            f.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("reading features: {e:?}"))?,
        );
        out.labels.extend(b.gold);
    }
    Ok((out, skipped))
}

/// Runs the probe (see the module docs): features (cached), the strength sweep, the refit, the
/// metrics, `model/` and `probe.json` in `cfg.out`.
pub fn run(cfg: &ProbeConfig, device: &Device, observer: &mut dyn Observer) -> anyhow::Result<ProbeReport> {
    if cfg.fewshot_k == Some(0) || cfg.batch_size == 0 || cfg.max_iter == 0 {
        anyhow::bail!("--fewshot-k, the batch size and the iterations must be at least 1");
    }
    let opts = TaskOptions {
        synthetic_len: cfg.synthetic_len,
        seed: cfg.seed,
        ..Default::default()
    };
    let held_opts = TaskOptions {
        synthetic_len: (cfg.synthetic_len / 2).max(1),
        ..opts.clone()
    };
    let train_set = open_task(&cfg.train, &opts).with_context(|| format!("--train {}", cfg.train))?;
    let head = TaskHead::of(&train_set, usize::MAX)?;
    if !head.is_classification() {
        anyhow::bail!(
            "{}: a linear probe needs class labels ({:?} is a fine-tuning task)",
            cfg.train,
            head.metric
        );
    }
    let tower = cfg.feature.unwrap_or(head.tower());
    let model_dir = crate::hub::resolve(&cfg.model).context("--model")?;
    let loaded = load_flava_model(&model_dir, device).with_context(|| format!("--model {}", cfg.model.display()))?;
    let max_length = crate::eval_cmd::EVAL_MAX_LENGTH.min(loaded.config.text_config.max_position_embeddings);
    let batcher = Batcher {
        head: head.clone(),
        tokenizer: find_tokenizer(&model_dir)?,
        processor: find_processor(&model_dir)?,
        max_length,
        keep_unlabelled: false,
    };
    let features_dir = cfg.features_dir.clone().unwrap_or_else(|| cfg.out.join("features"));
    let mut reused = vec![];
    let mut split = |name: &str, spec: &str, set_opts: &TaskOptions| -> anyhow::Result<Features> {
        let examples = if name == "train" {
            train_set.examples.clone()
        } else {
            open_task(spec, set_opts)
                .with_context(|| format!("--{name} {spec}"))?
                .examples
        };
        let fp = fingerprint(&model_dir, tower, &batcher, spec, &examples)?;
        let path = features_dir.join(format!("{name}.safetensors"));
        if path.is_file() {
            match Features::load(&path) {
                Ok((f, meta)) if meta.get("fingerprint") == Some(&fp) => {
                    observer.on_message(&format!("features {name}: reused {}", path.display()));
                    reused.push(name.to_string());
                    return Ok(f);
                }
                Ok(_) => observer.on_message(&format!(
                    "features {name}: {} is for another model or data; extracting again",
                    path.display()
                )),
                Err(e) => observer.on_message(&format!("warning: features {name}: {e:#}; extracting again")),
            }
        }
        let (f, skipped) = extract(
            &loaded.model,
            tower,
            &batcher,
            &examples,
            cfg.batch_size,
            device,
            &mut |done, total| observer.on_progress(&format!("features {name}"), done, total),
        )?;
        if skipped > 0 {
            observer.on_message(&format!("warning: {name}: {skipped} example(s) skipped"));
        }
        if f.is_empty() {
            anyhow::bail!("--{name} {spec}: no usable example ({skipped} skipped)");
        }
        let meta = HashMap::from([
            ("fingerprint".to_string(), fp),
            ("spec".to_string(), spec.to_string()),
            ("feature".to_string(), tower.to_string()),
            ("model".to_string(), cfg.model.display().to_string()),
        ]);
        f.save(&path, meta)?;
        Ok(f)
    };
    let mut train = split("train", &cfg.train, &opts)?;
    let val = split("val", &cfg.val, &held_opts)?;
    let test = match &cfg.test {
        Some(t) => Some(split("test", t, &held_opts)?),
        None => None,
    };
    if let Some(k) = cfg.fewshot_k {
        train = train.fewshot(k, cfg.seed);
    }
    let classes = head.outputs();
    observer.on_message(&format!(
        "linear probe on the {tower} CLS ({} features): {} training, {} validation{} rows, {classes} classes",
        train.dim,
        train.len(),
        val.len(),
        test.as_ref().map(|t| format!(", {} test", t.len())).unwrap_or_default()
    ));
    let sweep = sweep(&train, &val, classes, cfg.max_iter, observer)?;
    let on_val = fit(&train, classes, sweep.best, cfg.max_iter)?;
    let score = |p: &Probe, x: &Features| -> TaskEval {
        Scored {
            outputs: classes,
            ids: (0..x.len()).map(|i| i.to_string()).collect(),
            logits: p.logits(x),
            labelled: vec![true; x.len()],
            gold: x.labels.clone(),
            soft: vec![vec![]; x.len()],
            values: vec![0.0; x.len()],
            skipped: 0,
        }
        .eval(&head)
    };
    let val_eval = score(&on_val, &val);
    let refit = fit(&train.concat(&val), classes, sweep.best, cfg.max_iter)?;
    let test_eval = test.as_ref().map(|t| score(&refit, t));
    let model_dir = cfg.out.join("model");
    save_probe(
        &model_dir,
        loaded.model,
        &loaded.config,
        tower,
        &refit,
        &batcher,
        device,
    )?;
    let report = ProbeReport {
        feature: tower,
        dim: train.dim,
        strength: sweep.best,
        sweep,
        val: val_eval,
        test: test_eval,
        n_train: train.len(),
        model_dir,
        reused,
    };
    flava_vit::atomic::write_file(
        &cfg.out.join("probe.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}

/// The probe as a task model: the backbone with a linear head on `tower`'s CLS.
fn save_probe(
    dir: &Path,
    flava: FlavaModel,
    config: &FlavaConfig,
    tower: Tower,
    probe: &Probe,
    batcher: &Batcher,
    device: &Device,
) -> anyhow::Result<()> {
    let classifier = ClassifierConfig {
        tower,
        num_classes: probe.classes,
        hidden_size: 0,
        dropout: 0.0,
    };
    let mut model = FlavaForClassification::new(flava, config, &classifier, device);
    // Burn's Linear holds its weight as [in, out], the probe's own layout.
    let w = Tensor::<2>::from_data(
        TensorData::new(probe.weight.clone(), [probe.dim, probe.classes]),
        device,
    );
    let b = Tensor::<1>::from_data(TensorData::new(probe.bias.clone(), [probe.classes]), device);
    model.classifier.output.weight = Param::from_tensor(w);
    model.classifier.output.bias = Some(Param::from_tensor(b));
    save_task_model(dir, &model, config, &classifier, batcher)
}
