//! Evaluation: zero-shot classification, image-text retrieval, MLM and MIM accuracy
//! (`flava eval`, and the end of `flava pretrain`); fine-tuning adds its task metrics here.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use burn::prelude::*;
use flava_data::batch::BatchBuilder;
use flava_data::processor::ImageProcessor;
use flava_data::sources::{Record, SkipReason, Source};
use flava_data::stream::{decode, DecodedSample};
use flava_data::task::Task;
use flava_dvae::ImageCodebook;
use flava_fusion::{l2_normalize, FlavaModel};
use flava_objectives::{FlavaForPretraining, StepOptions};
use flava_text::Tokenizer;
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::pretrain::to_pretraining;
use crate::vocabulary::ClassVocabulary;

/// Images or texts embedded per forward pass.
pub const CHUNK: usize = 64;

/// Zero-shot classification result (`flava eval zero-shot --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShot {
    /// Top-1 accuracy in [0, 1].
    pub top1: f64,
    /// Top-5 accuracy in [0, 1].
    pub top5: f64,
    /// Images evaluated.
    pub n_images: usize,
    /// Class names, in label order.
    pub classes: Vec<String>,
    /// `(label, predicted)` class indices per image, in image order (for the confusion matrix
    /// of `flava report`; not written to JSON).
    #[serde(skip)]
    pub predictions: Vec<(usize, usize)>,
}

/// Recall at 1, 5 and 10.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// R@1 in [0, 1].
    pub r1: f64,
    /// R@5.
    pub r5: f64,
    /// R@10.
    pub r10: f64,
}

/// Retrieval result (`flava eval retrieval --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retrieval {
    /// Each image's query over all texts: found when any of its captions ranks within k.
    pub image_to_text: Recall,
    /// Each text's query over all images.
    pub text_to_image: Recall,
    /// Distinct images.
    pub n_images: usize,
    /// Texts.
    pub n_texts: usize,
    /// The first [`RETRIEVAL_EXAMPLES`] images with their best captions (for `flava report`;
    /// not written to JSON).
    #[serde(skip)]
    pub examples: Vec<RetrievalExample>,
}

/// Images kept as retrieval examples.
pub const RETRIEVAL_EXAMPLES: usize = 6;

/// A query image and the captions it ranks highest.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalExample {
    /// The image.
    pub image: image::RgbImage,
    /// Its top captions, best first: text, cosine similarity, and whether it is one of the
    /// image's own captions.
    pub top: Vec<(String, f32, bool)>,
}

/// `eval.json` of a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Zero-shot classification.
    pub zero_shot: Option<ZeroShot>,
    /// Retrieval.
    pub retrieval: Option<Retrieval>,
    /// Share of masked tokens predicted exactly (held-out texts).
    pub mlm_accuracy: Option<f64>,
    /// Share of masked patches whose visual token is predicted exactly (held-out images).
    pub mim_accuracy: Option<f64>,
    /// Chance levels of each metric, for reading the numbers.
    pub chance: BTreeMap<String, f64>,
}

/// Reads up to `n` decoded samples of one pass over `source` (skips counted and logged).
pub fn read_samples(source: &mut dyn Source, task: Task, n: usize) -> (Vec<DecodedSample>, usize) {
    source.start_epoch(0);
    let (mut out, mut skipped) = (Vec::new(), 0usize);
    let log = |key: &str, reason: SkipReason, detail: &str, skipped: usize| {
        // The first few are logged; the count is reported by the caller.
        if skipped <= flava_data::stream::LOGGED_SKIPS_PER_REASON as usize {
            eprintln!("skipped {key} ({reason}): {detail}");
        }
    };
    while out.len() < n {
        match source.next_record() {
            None => break,
            Some(Record::Skipped { reason, key, detail }) => {
                skipped += 1;
                log(&key, reason, &detail, skipped);
            }
            Some(Record::Sample(raw)) => {
                let key = raw.key.clone();
                match decode(raw, task) {
                    Ok(s) => out.push(s),
                    Err((reason, detail)) => {
                        skipped += 1;
                        log(&key, reason, &detail, skipped);
                    }
                }
            }
        }
    }
    (out, skipped)
}

/// Normalised image embeddings [n, d] of decoded images, in chunks.
pub fn image_embeddings(
    model: &FlavaModel,
    processor: &ImageProcessor,
    images: &[image::RgbImage],
    device: &Device,
) -> Tensor<2> {
    let parts: Vec<Tensor<2>> = images
        .chunks(CHUNK)
        .map(|c| {
            let dynamic: Vec<DynamicImage> = c.iter().map(|i| DynamicImage::ImageRgb8(i.clone())).collect();
            l2_normalize(model.image_features(processor.pixel_values(&dynamic, device)))
        })
        .collect();
    Tensor::cat(parts, 0)
}

/// Normalised text embeddings [n, d], in chunks.
pub fn text_embeddings(
    model: &FlavaModel,
    tokenizer: &Tokenizer,
    texts: &[String],
    max_length: usize,
    device: &Device,
) -> anyhow::Result<Tensor<2>> {
    let mut parts = Vec::new();
    for c in texts.chunks(CHUNK) {
        let b = tokenizer.encode_batch(c, max_length)?;
        let (ids, mask, _) = b.to_tensors(device);
        parts.push(l2_normalize(model.text_features(ids, Some(&mask))));
    }
    Ok(Tensor::cat(parts, 0))
}

fn host(t: Tensor<2>) -> (Vec<f32>, usize, usize) {
    let [n, m] = t.dims();
    (
        t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data"),
        n,
        m,
    )
}

/// Rank of `target`'s score in `row` (0 = best; ties count against the target).
fn rank_of(row: &[f32], target: f32) -> usize {
    row.iter().filter(|&&s| s >= target).count().saturating_sub(1)
}

/// Zero-shot from class-name prompts: per class, the mean of its normalised prompt embeddings,
/// re-normalised (CLIP's ensembling); predictions by cosine. `labels[i]` indexes `classes`.
pub fn zero_shot_from_embeddings(
    image: Tensor<2>,
    class_text: Tensor<2>,
    labels: &[usize],
    classes: Vec<String>,
) -> ZeroShot {
    let (s, n, c) = host(image.matmul(class_text.transpose()));
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut predictions = Vec::with_capacity(n);
    for (i, &label) in labels.iter().enumerate().take(n) {
        let row = &s[i * c..(i + 1) * c];
        let r = rank_of(row, row[label]);
        top1 += usize::from(r == 0);
        top5 += usize::from(r < 5);
        // The first best class (ties: the lowest index).
        let best = (0..c).fold(0, |b, k| if row[k] > row[b] { k } else { b });
        predictions.push((label, best));
    }
    ZeroShot {
        top1: top1 as f64 / n.max(1) as f64,
        top5: top5 as f64 / n.max(1) as f64,
        n_images: n,
        classes,
        predictions,
    }
}

/// Zero-shot classification of labelled images with prompts from `templates` (`{}` = class).
/// The candidates are `vocab`'s classes (all of them, whether or not the images show them; a
/// label is matched by key, then by name, and one it does not know is an error), else the
/// distinct labels of the images, sorted.
#[allow(clippy::too_many_arguments)]
pub fn zero_shot(
    model: &FlavaModel,
    tokenizer: &Tokenizer,
    processor: &ImageProcessor,
    samples: &[DecodedSample],
    templates: &[String],
    vocab: Option<&ClassVocabulary>,
    max_length: usize,
    device: &Device,
) -> anyhow::Result<ZeroShot> {
    let labelled: Vec<(&image::RgbImage, &str)> = samples
        .iter()
        .filter_map(|s| Some((s.image.as_ref()?, s.label.as_deref()?)))
        .collect();
    let (classes, labels): (Vec<String>, Vec<Option<usize>>) = match vocab {
        Some(v) => (v.names.clone(), labelled.iter().map(|(_, l)| v.index_of(l)).collect()),
        None => {
            let mut classes: Vec<String> = labelled.iter().map(|(_, l)| l.to_string()).collect();
            classes.sort();
            classes.dedup();
            let labels = labelled
                .iter()
                .map(|(_, l)| classes.binary_search(&l.to_string()).ok())
                .collect();
            (classes, labels)
        }
    };
    if classes.len() < 2 {
        anyhow::bail!(
            "zero-shot needs labelled images of at least 2 classes, found {}",
            classes.len()
        );
    }
    let unknown: Vec<&str> = labelled
        .iter()
        .zip(&labels)
        .filter(|(_, l)| l.is_none())
        .map(|((_, l), _)| *l)
        .collect();
    if !unknown.is_empty() {
        let mut names: Vec<&str> = unknown.clone();
        names.sort();
        names.dedup();
        anyhow::bail!(
            "{} image(s) have labels that --classes does not list ({}{}): give a class file with a \
             `label<TAB>name` line for each",
            unknown.len(),
            names
                .iter()
                .take(5)
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if names.len() > 5 { ", ..." } else { "" }
        );
    }
    let (imgs, labels): (Vec<image::RgbImage>, Vec<usize>) = labelled
        .iter()
        .zip(labels)
        .map(|((img, _), l)| ((*img).clone(), l.expect("checked above")))
        .unzip();
    let templates: Vec<String> = if templates.is_empty() {
        vec!["a photo of a {}.".into()]
    } else {
        templates.to_vec()
    };
    // 1,000 classes x 80 templates is minutes of text encoding on a CPU: show it.
    let bar = indicatif::ProgressBar::new(classes.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("class prompts {bar:30} {pos}/{len} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    if classes.len() < 50 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut class_emb = Vec::new();
    for c in &classes {
        let prompts: Vec<String> = templates.iter().map(|t| t.replace("{}", c)).collect();
        let e = text_embeddings(model, tokenizer, &prompts, max_length, device)?;
        let d = e.dims()[1];
        class_emb.push(e.mean_dim(0).reshape([1, d]));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let class_text = l2_normalize(Tensor::cat(class_emb, 0));
    let image = image_embeddings(model, processor, &imgs, device);
    Ok(zero_shot_from_embeddings(image, class_text, &labels, classes))
}

/// Identity of an image for grouping captions: hash of its pixels.
fn image_id(img: &image::RgbImage) -> u64 {
    let mut h = DefaultHasher::new();
    img.dimensions().hash(&mut h);
    img.as_raw().hash(&mut h);
    h.finish()
}

/// Recall from similarity scores [n_images, n_texts]; `owner[t]` is the image of text t.
pub fn recall_from_scores(scores: &[f32], n_images: usize, owner: &[usize]) -> (Recall, Recall) {
    let n_texts = owner.len();
    let mut i2t = [0usize; 3];
    let mut t2i = [0usize; 3];
    let ks = [1, 5, 10];
    for i in 0..n_images {
        let row = &scores[i * n_texts..(i + 1) * n_texts];
        let best = (0..n_texts)
            .filter(|&t| owner[t] == i)
            .map(|t| rank_of(row, row[t]))
            .min()
            .unwrap_or(usize::MAX);
        for (c, k) in i2t.iter_mut().zip(ks) {
            *c += usize::from(best < k);
        }
    }
    for (t, &img) in owner.iter().enumerate() {
        let col: Vec<f32> = (0..n_images).map(|i| scores[i * n_texts + t]).collect();
        let r = rank_of(&col, col[img]);
        for (c, k) in t2i.iter_mut().zip(ks) {
            *c += usize::from(r < k);
        }
    }
    let rec = |c: [usize; 3], n: usize| Recall {
        r1: c[0] as f64 / n.max(1) as f64,
        r5: c[1] as f64 / n.max(1) as f64,
        r10: c[2] as f64 / n.max(1) as f64,
    };
    (rec(i2t, n_images), rec(t2i, n_texts))
}

/// Image-to-text and text-to-image retrieval over image-caption pairs. Captions of the same
/// image (identical pixels) are grouped: an image counts as found when any of its captions is.
/// Similarities are computed in row chunks, so only [CHUNK, n_texts] scores exist at a time
/// beside the embeddings.
pub fn retrieval(
    model: &FlavaModel,
    tokenizer: &Tokenizer,
    processor: &ImageProcessor,
    samples: &[DecodedSample],
    max_length: usize,
    device: &Device,
) -> anyhow::Result<Retrieval> {
    let mut ids: Vec<u64> = Vec::new();
    let mut images = Vec::new();
    let mut texts = Vec::new();
    let mut owner = Vec::new();
    for s in samples {
        let (Some(img), Some(t)) = (&s.image, &s.text) else {
            continue;
        };
        let id = image_id(img);
        let k = match ids.iter().position(|&x| x == id) {
            Some(k) => k,
            None => {
                ids.push(id);
                images.push(img.clone());
                ids.len() - 1
            }
        };
        texts.push(t.clone());
        owner.push(k);
    }
    if images.is_empty() {
        anyhow::bail!("no image-caption pairs to evaluate");
    }
    let txt = text_embeddings(model, tokenizer, &texts, max_length, device)?;
    let mut scores = Vec::with_capacity(images.len() * texts.len());
    for c in images.chunks(CHUNK) {
        let img = image_embeddings(model, processor, c, device);
        scores.extend(host(img.matmul(txt.clone().transpose())).0);
    }
    let (i2t, t2i) = recall_from_scores(&scores, images.len(), &owner);
    let n_texts = texts.len();
    let examples = images
        .iter()
        .take(RETRIEVAL_EXAMPLES)
        .enumerate()
        .map(|(i, img)| {
            let row = &scores[i * n_texts..(i + 1) * n_texts];
            let mut order: Vec<usize> = (0..n_texts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            RetrievalExample {
                image: img.clone(),
                top: order
                    .into_iter()
                    .take(3)
                    .map(|t| (texts[t].clone(), row[t], owner[t] == i))
                    .collect(),
            }
        })
        .collect();
    Ok(Retrieval {
        image_to_text: i2t,
        text_to_image: t2i,
        examples,
        n_images: images.len(),
        n_texts,
    })
}

/// Chance levels of the metrics: 1/classes (top-1), 5/classes (top-5), k/n for recall, 1/vocab
/// for masked prediction.
pub fn chance_levels(
    classes: Option<usize>,
    retrieval: Option<&Retrieval>,
    text_vocab: usize,
    image_vocab: usize,
) -> BTreeMap<String, f64> {
    let mut c = BTreeMap::new();
    if let Some(k) = classes {
        c.insert("zero_shot_top1".into(), 1.0 / k as f64);
        c.insert("zero_shot_top5".into(), (5.0 / k as f64).min(1.0));
    }
    if let Some(r) = retrieval {
        for k in [1, 5, 10] {
            c.insert(format!("image_to_text_r{k}"), (k as f64 / r.n_texts as f64).min(1.0));
            c.insert(format!("text_to_image_r{k}"), (k as f64 / r.n_images as f64).min(1.0));
        }
    }
    c.insert("mlm_accuracy".into(), 1.0 / text_vocab as f64);
    c.insert("mim_accuracy".into(), 1.0 / image_vocab as f64);
    c
}

/// The rows of the evaluation table: name, value, chance level.
pub fn report_rows(r: &EvalReport) -> Vec<(String, f64, Option<f64>)> {
    let mut rows: Vec<(String, f64, Option<f64>)> = Vec::new();
    let ch = |k: &str| r.chance.get(k).copied();
    if let Some(z) = &r.zero_shot {
        rows.push((
            format!("zero-shot top-1 ({} classes, {} images)", z.classes.len(), z.n_images),
            z.top1,
            ch("zero_shot_top1"),
        ));
        rows.push(("zero-shot top-5".into(), z.top5, ch("zero_shot_top5")));
    }
    if let Some(x) = &r.retrieval {
        for (name, rec, key) in [
            ("image→text", x.image_to_text, "image_to_text"),
            ("text→image", x.text_to_image, "text_to_image"),
        ] {
            for (k, v) in [(1, rec.r1), (5, rec.r5), (10, rec.r10)] {
                rows.push((
                    format!("{name} R@{k} ({} images, {} texts)", x.n_images, x.n_texts),
                    v,
                    ch(&format!("{key}_r{k}")),
                ));
            }
        }
    }
    if let Some(a) = r.mlm_accuracy {
        rows.push(("MLM accuracy (held-out)".into(), a, ch("mlm_accuracy")));
    }
    if let Some(a) = r.mim_accuracy {
        rows.push(("MIM accuracy (held-out)".into(), a, ch("mim_accuracy")));
    }
    rows
}

/// The printed evaluation table: each metric beside its chance level.
pub fn render_report(r: &EvalReport) -> String {
    let mut s = format!("{:<48} {:>9} {:>9}\n", "metric", "value", "chance");
    for (name, v, c) in report_rows(r) {
        let c = c.map_or("-".to_string(), |c| format!("{:.2}%", 100.0 * c));
        s += &format!("{name:<48} {:>8.2}% {c:>9}\n", 100.0 * v);
    }
    s
}

/// Masked-prediction accuracy (argmax equals the target, over the masked positions) on
/// `samples` of `task`: MLM for text, MIM for images (targets from `codebook`), batched by
/// `builder` with its training masking (batch seeds apart from training's).
pub fn masked_accuracy(
    model: &FlavaForPretraining,
    codebook: &ImageCodebook,
    builder: &BatchBuilder,
    samples: &[DecodedSample],
    task: Task,
    device: &Device,
) -> anyhow::Result<f64> {
    let (mut hit, mut total) = (0usize, 0usize);
    for (i, chunk) in samples.chunks(CHUNK).enumerate() {
        let host = builder.build(task, chunk.to_vec(), 1_000_000 + i as u64)?;
        let batch = to_pretraining(&host, device);
        let opts = StepOptions {
            codebook: Some(codebook),
            ..Default::default()
        };
        let out = model.forward(&batch, &opts)?;
        let (logits, targets): (Option<Tensor<2>>, Vec<usize>) = match task {
            Task::Text => (out.logits.mlm, batch.mlm.map(|m| m.targets).unwrap_or_default()),
            _ => {
                let t = out.mim_targets.unwrap_or_default();
                let mask = &host.bool_masked_pos;
                let targets = (0..mask.len().min(t.len()))
                    .filter(|&j| mask[j])
                    .map(|j| t[j])
                    .collect();
                (out.logits.mim, targets)
            }
        };
        if let Some(l) = logits {
            let pred: Vec<i64> = l
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .unwrap_or_default();
            hit += pred.iter().zip(&targets).filter(|(p, t)| **p as usize == **t).count();
            total += targets.len();
        }
    }
    Ok(hit as f64 / total.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_hand_computed() {
        // 2 images, 3 texts; texts 0 and 1 belong to image 0, text 2 to image 1.
        // Image 0 ranks text 2 first, then text 1: found at rank 1 (R@1 miss, R@5 hit).
        // Image 1 ranks text 2 first: R@1 hit.
        let scores = [0.1, 0.5, 0.9, /* image 1 */ 0.2, 0.1, 0.8];
        let (i2t, t2i) = recall_from_scores(&scores, 2, &[0, 0, 1]);
        assert_eq!((i2t.r1, i2t.r5), (0.5, 1.0));
        // Text 0: image 1 (0.2) beats its image 0 (0.1): miss; text 1: 0.5 > 0.1, hit; text 2: its
        // image 1 (0.8) is beaten by image 0 (0.9): miss. R@5 covers both images.
        assert!((t2i.r1 - 1.0 / 3.0).abs() < 1e-12 && t2i.r5 == 1.0, "{t2i:?}");
    }

    #[test]
    fn zero_shot_hand_computed() {
        let device = Device::flex();
        let img = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], &device);
        let cls = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
        // Predictions: 0, 1, 1. Labels: 0, 0, 1 → 2/3 top-1; top-5 with 2 classes: all.
        let z = zero_shot_from_embeddings(img, cls, &[0, 0, 1], vec!["a".into(), "b".into()]);
        assert!((z.top1 - 2.0 / 3.0).abs() < 1e-12 && z.top5 == 1.0 && z.n_images == 3);
    }
}
