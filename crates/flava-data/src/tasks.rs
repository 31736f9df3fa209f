//! Downstream task data: labelled examples for fine-tuning and evaluation, read from the files
//! users download (an ImageFolder tree, CSV/JSONL with `image`, `text`, `text_pair`, `label`
//! columns, GLUE TSVs) or generated from the synthetic scenes (a VQA set and a 24-class image
//! set), all in memory (images stay undecoded until a batch needs them).
//!
//! Specs: `synthetic:vqa[:heldout]`, `synthetic:classes[:heldout]`, `imagefolder:DIR` (or a
//! plain directory), `csv:FILE`, `jsonl:FILE`, `glue:TASK:FILE.tsv`, `memes:FILE.jsonl`
//! (Hateful Memes), `snli-ve:FILE.jsonl:IMAGE_DIR`, `vqa:QUESTIONS.json:ANNOTATIONS.json:IMAGE_DIR`
//! (VQAv2; `-` for the test split's missing annotations).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sources::{check_file_size, read_err, read_image_folder, SkipReason, SourceError};
use crate::synthetic::{render, scene, Object, Split, COLOURS, PATTERNS, SHAPES};

/// What an example is trained against.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A class name.
    Label(String),
    /// The annotators' answers (VQA: usually ten), soft-scored against the answer vocabulary.
    Answers(Vec<String>),
    /// A real value (STS-B).
    Value(f32),
}

/// Where an example's image is.
#[derive(Debug, Clone)]
pub enum ImageRef {
    /// A file, read and decoded when the batch is built.
    File(PathBuf),
    /// Pixels (synthetic).
    Pixels(RgbImage),
}

/// One labelled example.
#[derive(Debug, Clone)]
pub struct Example {
    /// Identifier (file, row, question id), for predictions and logs.
    pub id: String,
    /// The image, for image and vision-language tasks.
    pub image: Option<ImageRef>,
    /// The text (sentence, question, caption).
    pub text: Option<String>,
    /// The second sentence of a pair.
    pub text_pair: Option<String>,
    /// The target; `None` on unlabelled test splits.
    pub target: Option<Target>,
}

/// Which encoder a task reads, by the inputs its examples have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Images only: the image encoder's CLS.
    Image,
    /// Text only (or pairs): the text encoder's CLS.
    Text,
    /// Image and text: the multimodal encoder's CLS.
    Multimodal,
}

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Top-1 accuracy.
    Accuracy,
    /// VQA accuracy of the top answer.
    VqaAccuracy,
    /// F1 of the positive class (MRPC, QQP), with accuracy.
    F1,
    /// AUROC of the positive class (Hateful Memes), with accuracy.
    Auroc,
    /// Pearson correlation (STS-B).
    Pearson,
    /// Matthews correlation (CoLA), with accuracy.
    Matthews,
}

/// A task's examples and what is known about them.
#[derive(Debug, Clone)]
pub struct TaskSet {
    /// The spec it was read from.
    pub spec: String,
    /// A short task name (`vqa`, `sst2`, `imagefolder`, ...).
    pub task: String,
    /// The encoder the task reads.
    pub kind: TaskKind,
    /// The task's metric.
    pub metric: Metric,
    /// The class names in index order, when the task fixes them (GLUE, ImageFolder); `None`
    /// for answer vocabularies and labels gathered from the training data.
    pub labels: Option<Vec<String>>,
    /// The examples.
    pub examples: Vec<Example>,
    /// Records that could not be used, by reason.
    pub skipped: BTreeMap<SkipReason, u64>,
}

impl TaskSet {
    /// `self`, or `NoRecords` naming `path` when no example was usable.
    fn non_empty(self, path: &Path, what: &str) -> Result<Self, SourceError> {
        if self.examples.is_empty() {
            return Err(SourceError::NoRecords(format!("{} has no {what}", path.display())));
        }
        Ok(self)
    }
}

/// Options for [`open_task`].
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// Examples of a synthetic set.
    pub synthetic_len: usize,
    /// Side of synthetic images.
    pub synthetic_image_size: u32,
    /// Seed of the synthetic generator.
    pub seed: u64,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            synthetic_len: 4000,
            synthetic_image_size: 64,
            seed: 0,
        }
    }
}

/// Reads a task from its spec (see the module docs).
pub fn open_task(spec: &str, opts: &TaskOptions) -> Result<TaskSet, SourceError> {
    if let Some(rest) = spec.strip_prefix("synthetic:") {
        return synthetic_task(spec, rest, opts);
    }
    if let Some(rest) = spec.strip_prefix("glue:") {
        let (task, file) = rest.split_once(':').ok_or_else(|| SourceError::Unknown(spec.into()))?;
        return read_glue(spec, task, Path::new(file));
    }
    if let Some(file) = spec.strip_prefix("csv:") {
        return read_table(spec, Path::new(file), false);
    }
    if let Some(file) = spec.strip_prefix("jsonl:") {
        return read_table(spec, Path::new(file), true);
    }
    if let Some(file) = spec.strip_prefix("memes:") {
        return read_memes(spec, Path::new(file));
    }
    if let Some(rest) = spec.strip_prefix("snli-ve:") {
        let (file, images) = rest.rsplit_once(':').ok_or_else(|| SourceError::Unknown(spec.into()))?;
        return read_snli_ve(spec, Path::new(file), Path::new(images));
    }
    if let Some(rest) = spec.strip_prefix("vqa:") {
        let mut parts = rest.splitn(3, ':');
        let (Some(q), Some(a), Some(images)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SourceError::Unknown(spec.into()));
        };
        return read_vqa(spec, Path::new(q), Path::new(a), Path::new(images));
    }
    let dir = spec.strip_prefix("imagefolder:").unwrap_or(spec);
    if Path::new(dir).is_dir() {
        let (entries, classes) = read_image_folder(Path::new(dir))?;
        let examples = entries
            .into_iter()
            .map(|e| Example {
                id: e.key,
                image: e.image.map(ImageRef::File),
                text: None,
                text_pair: None,
                target: e.label.map(Target::Label),
            })
            .collect();
        return Ok(TaskSet {
            spec: spec.into(),
            task: "imagefolder".into(),
            kind: TaskKind::Image,
            metric: Metric::Accuracy,
            labels: Some(classes),
            examples,
            skipped: BTreeMap::new(),
        });
    }
    if spec.ends_with(".csv") || spec.ends_with(".tsv") {
        return read_table(spec, Path::new(spec), false);
    }
    if spec.ends_with(".jsonl") {
        return read_table(spec, Path::new(spec), true);
    }
    Err(SourceError::Unknown(spec.into()))
}

// ---------------------------------------------------------------------------------------------
// Synthetic

/// Answers of the synthetic VQA set, in a fixed order.
pub fn synthetic_vqa_answers() -> Vec<String> {
    let mut v: Vec<String> = COLOURS.iter().map(|(c, _)| c.to_string()).collect();
    v.extend(PATTERNS.iter().map(|p| p.to_string()));
    v.extend(SHAPES.iter().map(|s| s.to_string()));
    v.extend(["big", "small", "one", "two", "three", "yes", "no"].map(String::from));
    v
}

/// A question about `objs` and its answer, chosen by `rng`: the colour, pattern or size of an
/// object named by its shape or by its colour (a property unique in the scene), the shape of the
/// object of a colour, the colour of the leftmost or rightmost object, the number of objects, or
/// whether an object of a colour is there.
pub fn synthetic_question(objs: &[Object], rng: &mut impl Rng) -> (String, String) {
    let unique = |f: &dyn Fn(&Object) -> usize, o: &Object| objs.iter().filter(|p| f(p) == f(o)).count() == 1;
    let count = || ["one", "two", "three"][objs.len().clamp(1, 3) - 1];
    for _ in 0..8 {
        let o = &objs[rng.random_range(0..objs.len())];
        let by_shape = unique(&|p: &Object| p.shape, o);
        let by_colour = unique(&|p: &Object| p.colour, o);
        let shape = SHAPES[o.shape];
        let colour = COLOURS[o.colour].0;
        let size = if o.big { "big" } else { "small" };
        match rng.random_range(0..9) {
            0 if by_shape => return (format!("what colour is the {shape}?"), colour.into()),
            1 if by_shape => return (format!("what pattern is the {shape}?"), PATTERNS[o.pattern].into()),
            2 if by_shape => return (format!("is the {shape} big or small?"), size.into()),
            3 => return ("how many objects are there?".into(), count().into()),
            4 if by_colour => return (format!("what shape is the {colour} object?"), shape.into()),
            5 => {
                let c = rng.random_range(0..COLOURS.len());
                let yes = objs.iter().any(|p| p.colour == c);
                let q = format!("is there a {} object?", COLOURS[c].0);
                return (q, if yes { "yes" } else { "no" }.into());
            }
            6 if by_colour => {
                return (
                    format!("what pattern is the {colour} object?"),
                    PATTERNS[o.pattern].into(),
                )
            }
            7 if by_colour => return (format!("is the {colour} object big or small?"), size.into()),
            8 if objs.len() > 1 => {
                // The leftmost (or rightmost) object, asked about only when it is clearly so.
                let left = rng.random::<bool>();
                let mut by_x: Vec<&Object> = objs.iter().collect();
                by_x.sort_by(|a, b| a.cx.total_cmp(&b.cx));
                if !left {
                    by_x.reverse();
                }
                if (by_x[0].cx - by_x[1].cx).abs() < 0.1 {
                    continue;
                }
                let side = if left { "left" } else { "right" };
                return (
                    format!("what colour is the object on the {side}?"),
                    COLOURS[by_x[0].colour].0.into(),
                );
            }
            _ => {}
        }
    }
    ("how many objects are there?".into(), count().into())
}

fn synthetic_task(spec: &str, rest: &str, opts: &TaskOptions) -> Result<TaskSet, SourceError> {
    let (name, split) = match rest.split_once(':') {
        Some((n, "heldout")) => (n, Split::HeldOut),
        Some(_) => return Err(SourceError::Unknown(spec.into())),
        None => (rest, Split::Train),
    };
    let size = opts.synthetic_image_size;
    // Index ranges apart per split, so held-out scenes are never training scenes.
    let offset = if split == Split::HeldOut { 1 << 40 } else { 0 };
    match name {
        "vqa" => {
            let examples = (0..opts.synthetic_len as u64)
                .map(|i| {
                    let objs = scene(opts.seed, split, offset + i);
                    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ (offset + i).wrapping_mul(0x9E37_79B9));
                    let (q, a) = synthetic_question(&objs, &mut rng);
                    Example {
                        id: format!("synthetic-vqa-{}", offset + i),
                        image: Some(ImageRef::Pixels(render(
                            &objs,
                            size,
                            opts.seed ^ (offset + i).rotate_left(17),
                        ))),
                        text: Some(q),
                        text_pair: None,
                        target: Some(Target::Answers(vec![a; 10])),
                    }
                })
                .collect();
            Ok(TaskSet {
                spec: spec.into(),
                task: "vqa".into(),
                kind: TaskKind::Multimodal,
                metric: Metric::VqaAccuracy,
                labels: None,
                examples,
                skipped: BTreeMap::new(),
            })
        }
        "classes" => {
            // Single-object images labelled "colour pattern" (the zero-shot classes).
            let examples = (0..opts.synthetic_len as u64)
                .map(|i| {
                    let objs = scene(opts.seed, Split::ZeroShot, offset + i);
                    let o = &objs[0];
                    Example {
                        id: format!("synthetic-classes-{}", offset + i),
                        image: Some(ImageRef::Pixels(render(
                            &objs,
                            size,
                            opts.seed ^ (offset + i).rotate_left(17),
                        ))),
                        text: None,
                        text_pair: None,
                        target: Some(Target::Label(format!(
                            "{} {}",
                            COLOURS[o.colour].0, PATTERNS[o.pattern]
                        ))),
                    }
                })
                .collect();
            Ok(TaskSet {
                spec: spec.into(),
                task: "classes".into(),
                kind: TaskKind::Image,
                metric: Metric::Accuracy,
                labels: Some(crate::synthetic::class_names()),
                examples,
                skipped: BTreeMap::new(),
            })
        }
        _ => Err(SourceError::Unknown(spec.into())),
    }
}

// ---------------------------------------------------------------------------------------------
// Files

/// One row of a table as column → value.
type Row = BTreeMap<String, serde_json::Value>;

/// The rows of a table (id, row) and the rows skipped, by reason.
type Rows = (Vec<(String, Row)>, BTreeMap<SkipReason, u64>);

fn rows(path: &Path, jsonl: bool) -> Result<Rows, SourceError> {
    check_file_size(path)?;
    let mut out = Vec::new();
    let mut skipped = BTreeMap::new();
    if jsonl {
        let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            match serde_json::from_str::<Row>(line) {
                Ok(r) => out.push((format!("{}:{}", path.display(), i + 1), r)),
                Err(e) => {
                    log::warn!("{}:{}: not a JSON object: {e}", path.display(), i + 1);
                    *skipped.entry(SkipReason::BadJson).or_default() += 1;
                }
            }
        }
    } else {
        let tsv = path.extension().is_some_and(|e| e == "tsv");
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(if tsv { b'\t' } else { b',' })
            .quoting(!tsv)
            .flexible(true)
            .from_path(path)
            .map_err(|e| read_err(path, e))?;
        let headers = rdr.headers().map_err(|e| read_err(path, e))?.clone();
        for (i, rec) in rdr.records().enumerate() {
            let rec = rec.map_err(|e| read_err(path, e))?;
            let row: Row = headers
                .iter()
                .zip(rec.iter())
                .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.to_string())))
                .collect();
            out.push((format!("{}:{}", path.display(), i + 2), row));
        }
    }
    if out.is_empty() {
        return Err(SourceError::NoRecords(format!("{} has no rows", path.display())));
    }
    Ok((out, skipped))
}

fn text_of(row: &Row, col: &str) -> Option<String> {
    match row.get(col)? {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// CSV/TSV/JSONL with `image` (relative to the file), `text`, `text_pair` and `label` columns;
/// the task follows the columns present.
fn read_table(spec: &str, path: &Path, jsonl: bool) -> Result<TaskSet, SourceError> {
    let (rows, mut skipped) = rows(path, jsonl)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let has = |c: &str| rows.iter().any(|(_, r)| r.contains_key(c));
    let (with_image, with_text) = (has("image"), has("text"));
    if !with_image && !with_text {
        return Err(read_err(path, "no `image` or `text` column"));
    }
    let kind = match (with_image, with_text) {
        (true, true) => TaskKind::Multimodal,
        (true, false) => TaskKind::Image,
        _ => TaskKind::Text,
    };
    let mut examples = Vec::new();
    for (id, r) in rows {
        let image = text_of(&r, "image").map(|p| ImageRef::File(base.join(p)));
        let text = text_of(&r, "text");
        if (with_image && image.is_none()) || (with_text && text.is_none()) {
            *skipped
                .entry(if with_image && image.is_none() {
                    SkipReason::MissingImage
                } else {
                    SkipReason::MissingCaption
                })
                .or_default() += 1;
            continue;
        }
        examples.push(Example {
            id: text_of(&r, "id").unwrap_or(id),
            image,
            text,
            text_pair: text_of(&r, "text_pair"),
            target: text_of(&r, "label").map(Target::Label),
        });
    }
    TaskSet {
        spec: spec.into(),
        task: if jsonl { "jsonl" } else { "csv" }.into(),
        kind,
        metric: Metric::Accuracy,
        labels: None,
        examples,
        skipped,
    }
    .non_empty(path, "usable row")
}

/// Hateful Memes (`{"id", "img": "img/ID.png", "label", "text"}` per line, `img` relative to
/// the file; the test split has no label): binary, AUROC.
fn read_memes(spec: &str, path: &Path) -> Result<TaskSet, SourceError> {
    let (rows, mut skipped) = rows(path, true)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut examples = Vec::new();
    for (id, r) in rows {
        let (Some(img), Some(text)) = (text_of(&r, "img"), text_of(&r, "text")) else {
            *skipped.entry(SkipReason::MissingImage).or_default() += 1;
            continue;
        };
        examples.push(Example {
            id: text_of(&r, "id").unwrap_or(id),
            image: Some(ImageRef::File(base.join(img))),
            text: Some(text),
            text_pair: None,
            target: text_of(&r, "label").map(Target::Label),
        });
    }
    TaskSet {
        spec: spec.into(),
        task: "memes".into(),
        kind: TaskKind::Multimodal,
        metric: Metric::Auroc,
        labels: Some(vec!["0".into(), "1".into()]),
        examples,
        skipped,
    }
    .non_empty(path, "usable meme")
}

/// SNLI-VE (`Flickr30K_ID`, `sentence2`, `gold_label` per line; images `IMAGE_DIR/ID.jpg`):
/// 3-way accuracy.
fn read_snli_ve(spec: &str, path: &Path, images: &Path) -> Result<TaskSet, SourceError> {
    let names = ["entailment", "neutral", "contradiction"];
    let (rows, mut skipped) = rows(path, true)?;
    let mut examples = Vec::new();
    for (id, r) in rows {
        let (Some(image), Some(text)) = (text_of(&r, "Flickr30K_ID"), text_of(&r, "sentence2")) else {
            *skipped.entry(SkipReason::MissingCaption).or_default() += 1;
            continue;
        };
        let label = text_of(&r, "gold_label");
        if label.as_deref().is_some_and(|l| !names.contains(&l)) {
            *skipped.entry(SkipReason::BadJson).or_default() += 1;
            continue;
        }
        examples.push(Example {
            id: text_of(&r, "pairID").unwrap_or(id),
            image: Some(ImageRef::File(images.join(format!("{image}.jpg")))),
            text: Some(text),
            text_pair: None,
            target: label.map(Target::Label),
        });
    }
    TaskSet {
        spec: spec.into(),
        task: "snli-ve".into(),
        kind: TaskKind::Multimodal,
        metric: Metric::Accuracy,
        labels: Some(names.map(String::from).to_vec()),
        examples,
        skipped,
    }
    .non_empty(path, "usable pair")
}

/// VQAv2 as distributed: the questions file (`{"questions": [{"image_id", "question",
/// "question_id"}]}`), the annotations file (`{"annotations": [{"question_id", "answers":
/// [{"answer"}, …]}]}`, absent for test: pass `-`) and the COCO image directory
/// (`COCO_{split}2014_{image_id:012}.jpg`, the split taken from the directory name, or any file
/// ending in `_{image_id:012}.jpg`).
fn read_vqa(spec: &str, questions: &Path, annotations: &Path, images: &Path) -> Result<TaskSet, SourceError> {
    #[derive(Deserialize)]
    struct Q {
        image_id: u64,
        question: String,
        question_id: u64,
    }
    #[derive(Deserialize)]
    struct Qs {
        questions: Vec<Q>,
    }
    #[derive(Deserialize)]
    struct Ans {
        answer: String,
    }
    #[derive(Deserialize)]
    struct A {
        question_id: u64,
        answers: Vec<Ans>,
    }
    #[derive(Deserialize)]
    struct As {
        annotations: Vec<A>,
    }
    let read = |p: &Path| -> Result<String, SourceError> {
        check_file_size(p)?;
        std::fs::read_to_string(p).map_err(|e| read_err(p, e))
    };
    let qs: Qs = serde_json::from_str(&read(questions)?).map_err(|e| read_err(questions, e))?;
    let answers: BTreeMap<u64, Vec<String>> = if annotations == Path::new("-") {
        BTreeMap::new()
    } else {
        let a: As = serde_json::from_str(&read(annotations)?).map_err(|e| read_err(annotations, e))?;
        a.annotations
            .into_iter()
            .map(|a| (a.question_id, a.answers.into_iter().map(|x| x.answer).collect()))
            .collect()
    };
    // COCO_{split}2014_{id:012}.jpg: the split from the directory name (train2014 → train2014).
    let split = images
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut skipped = BTreeMap::new();
    let mut examples = Vec::new();
    for q in qs.questions {
        let target = answers.get(&q.question_id).cloned().map(Target::Answers);
        if annotations != Path::new("-") && target.is_none() {
            *skipped.entry(SkipReason::MissingCaption).or_default() += 1;
            continue;
        }
        examples.push(Example {
            id: q.question_id.to_string(),
            image: Some(ImageRef::File(
                images.join(format!("COCO_{split}_{:012}.jpg", q.image_id)),
            )),
            text: Some(q.question),
            text_pair: None,
            target,
        });
    }
    TaskSet {
        spec: spec.into(),
        task: "vqa".into(),
        kind: TaskKind::Multimodal,
        metric: Metric::VqaAccuracy,
        labels: None,
        examples,
        skipped,
    }
    .non_empty(questions, "question")
}

/// The GLUE tasks: (name, first sentence, second sentence, label column, label names, metric).
type GlueTask = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static [&'static str],
    Metric,
);

const GLUE: [GlueTask; 9] = [
    ("sst2", "sentence", None, "label", &["0", "1"], Metric::Accuracy),
    ("cola", "sentence", None, "label", &["0", "1"], Metric::Matthews),
    (
        "mrpc",
        "#1 String",
        Some("#2 String"),
        "Quality",
        &["0", "1"],
        Metric::F1,
    ),
    (
        "qqp",
        "question1",
        Some("question2"),
        "is_duplicate",
        &["0", "1"],
        Metric::F1,
    ),
    ("stsb", "sentence1", Some("sentence2"), "score", &[], Metric::Pearson),
    (
        "mnli",
        "sentence1",
        Some("sentence2"),
        "gold_label",
        &["entailment", "neutral", "contradiction"],
        Metric::Accuracy,
    ),
    (
        "qnli",
        "question",
        Some("sentence"),
        "label",
        &["entailment", "not_entailment"],
        Metric::Accuracy,
    ),
    (
        "rte",
        "sentence1",
        Some("sentence2"),
        "label",
        &["entailment", "not_entailment"],
        Metric::Accuracy,
    ),
    (
        "wnli",
        "sentence1",
        Some("sentence2"),
        "label",
        &["0", "1"],
        Metric::Accuracy,
    ),
];

/// A GLUE TSV as distributed (header row, the task's own columns; CoLA's train/dev files have
/// no header: source, label, original label, sentence).
fn read_glue(spec: &str, task: &str, path: &Path) -> Result<TaskSet, SourceError> {
    let &(name, a, b, label, names, metric) = GLUE.iter().find(|g| g.0 == task).ok_or_else(|| {
        SourceError::Unknown(format!(
            "{spec}: unknown GLUE task `{task}` (sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli)"
        ))
    })?;
    check_file_size(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split('\t').collect();
    let headerless = name == "cola" && !header.contains(&"sentence");
    let col = |c: &str| header.iter().position(|h| *h == c);
    let (ia, ib, il) = if headerless {
        (Some(3), None, Some(1))
    } else {
        (col(a), b.and_then(col), col(label))
    };
    let ia = ia.ok_or_else(|| read_err(path, format!("no column `{a}` for GLUE {name}")))?;
    if b.is_some() && ib.is_none() {
        return Err(read_err(
            path,
            format!("no column `{}` for GLUE {name}", b.unwrap_or("")),
        ));
    }
    let all: Vec<&str> = if headerless {
        text.lines().collect()
    } else {
        lines.collect()
    };
    let mut examples = Vec::new();
    let mut skipped = BTreeMap::new();
    for (i, line) in all.iter().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let Some(first) = f.get(ia).filter(|s| !s.is_empty()) else {
            *skipped.entry(SkipReason::MissingCaption).or_default() += 1;
            continue;
        };
        let target = match il.and_then(|j| f.get(j)).map(|s| s.trim()).filter(|s| !s.is_empty()) {
            None => None,
            Some(v) if names.is_empty() => match v.parse::<f32>() {
                Ok(x) => Some(Target::Value(x)),
                Err(_) => {
                    *skipped.entry(SkipReason::BadJson).or_default() += 1;
                    continue;
                }
            },
            Some(v) if names.contains(&v) => Some(Target::Label(v.to_string())),
            Some(v) => {
                log::warn!("{}:{}: label `{v}` is not one of {names:?}", path.display(), i + 2);
                *skipped.entry(SkipReason::BadJson).or_default() += 1;
                continue;
            }
        };
        examples.push(Example {
            id: format!("{}:{}", path.display(), i + 2),
            image: None,
            text: Some(first.to_string()),
            text_pair: ib.and_then(|j| f.get(j)).map(|s| s.to_string()),
            target,
        });
    }
    TaskSet {
        spec: spec.into(),
        task: name.into(),
        kind: TaskKind::Text,
        metric,
        labels: (!names.is_empty()).then(|| names.iter().map(|s| s.to_string()).collect()),
        examples,
        skipped,
    }
    .non_empty(path, "usable row")
}

/// The VQA soft score of `answer` given the annotators' `answers`: the mean over the ten
/// leave-one-out subsets of `min(1, matches / 3)` (the official formula; for fewer than ten
/// answers, over each leave-one-out subset that exists).
pub fn vqa_score(answer: &str, answers: &[String]) -> f32 {
    let n = answers.len();
    if n == 0 {
        return 0.0;
    }
    if n == 1 {
        return f32::from(answers[0] == answer);
    }
    let matches = answers.iter().filter(|a| *a == answer).count();
    let total: f32 = (0..n)
        .map(|i| {
            let m = matches - usize::from(answers[i] == answer);
            (m as f32 / 3.0).min(1.0)
        })
        .sum();
    total / n as f32
}

/// The `k` most frequent answers of `examples` (ties by first appearance), the answer
/// vocabulary of a VQA task.
pub fn answer_vocabulary(examples: &[Example], k: usize) -> Vec<String> {
    let mut count: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut order = 0;
    for e in examples {
        if let Some(Target::Answers(a)) = &e.target {
            for x in a {
                let c = count.entry(x.as_str()).or_insert((0, order));
                c.0 += 1;
                order += 1;
            }
        }
    }
    let mut v: Vec<(&str, (usize, usize))> = count.into_iter().collect();
    v.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.1 .1.cmp(&b.1 .1)));
    v.into_iter().take(k).map(|(a, _)| a.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vqa_scores_follow_the_official_formula() {
        let ten = |yes: usize| -> Vec<String> {
            (0..10)
                .map(|i| if i < yes { "yes" } else { "no" }.to_string())
                .collect()
        };
        // 3 or more matching annotators: full score; 2: 0.6 (leave-one-out mean); 1: 0.3; 0: 0.
        assert_eq!(vqa_score("yes", &ten(10)), 1.0);
        assert_eq!(vqa_score("yes", &ten(4)), 1.0);
        assert!((vqa_score("yes", &ten(3)) - 0.9).abs() < 1e-6);
        assert!((vqa_score("yes", &ten(2)) - 0.6).abs() < 1e-6);
        assert!((vqa_score("yes", &ten(1)) - 0.3).abs() < 1e-6);
        assert_eq!(vqa_score("maybe", &ten(5)), 0.0);
    }

    /// The question alone does not give the answer: the best answer per question text, learnt
    /// from the 4000 training questions, scores this on the 1000 held-out ones (what a VQA model
    /// that ignores the image can reach at most, about; the image gives 100%).
    #[test]
    fn synthetic_vqa_needs_the_image() {
        let opts = TaskOptions::default();
        let train = open_task("synthetic:vqa", &opts).unwrap();
        let val = open_task(
            "synthetic:vqa:heldout",
            &TaskOptions {
                synthetic_len: 1000,
                ..opts
            },
        )
        .unwrap();
        let answer = |e: &Example| match &e.target {
            Some(Target::Answers(a)) => a[0].clone(),
            t => panic!("{t:?}"),
        };
        let mut counts: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for e in &train.examples {
            *counts
                .entry(e.text.clone().unwrap())
                .or_default()
                .entry(answer(e))
                .or_default() += 1;
        }
        let best = |q: &str| {
            counts
                .get(q)
                .and_then(|c| c.iter().max_by_key(|(_, n)| **n))
                .map(|(a, _)| a.clone())
        };
        let right = val
            .examples
            .iter()
            .filter(|e| best(e.text.as_deref().unwrap()) == Some(answer(e)))
            .count();
        let acc = right as f64 / val.examples.len() as f64;
        eprintln!("question-only accuracy {acc:.4} over {} questions", val.examples.len());
        assert!((0.30..0.45).contains(&acc), "question-only accuracy {acc}");
    }

    /// Every question's answer, re-derived from the scene it was asked about.
    #[test]
    fn synthetic_questions_are_answered_by_their_scene() {
        let name_of = |q: &str, prefix: &str, suffix: &str| -> Option<String> {
            q.strip_prefix(prefix)?.strip_suffix(suffix).map(String::from)
        };
        let mut kinds = std::collections::BTreeSet::new();
        for i in 0..600u64 {
            let objs = scene(0, Split::HeldOut, i);
            let mut rng = ChaCha8Rng::seed_from_u64(i);
            let (q, a) = synthetic_question(&objs, &mut rng);
            let by_shape = |s: &str| objs.iter().find(|o| SHAPES[o.shape] == s).unwrap();
            let by_colour = |c: &str| objs.iter().find(|o| COLOURS[o.colour].0 == c).unwrap();
            let size = |o: &Object| if o.big { "big" } else { "small" };
            let expected: String = if let Some(s) = name_of(&q, "what colour is the object on the ", "?") {
                let pick = if s == "left" {
                    objs.iter().min_by(|a, b| a.cx.total_cmp(&b.cx))
                } else {
                    objs.iter().max_by(|a, b| a.cx.total_cmp(&b.cx))
                };
                kinds.insert("position");
                COLOURS[pick.unwrap().colour].0.into()
            } else if let Some(s) = name_of(&q, "what colour is the ", "?") {
                kinds.insert("colour");
                COLOURS[by_shape(&s).colour].0.into()
            } else if let Some(s) = name_of(&q, "what pattern is the ", " object?") {
                kinds.insert("pattern by colour");
                PATTERNS[by_colour(&s).pattern].into()
            } else if let Some(s) = name_of(&q, "what pattern is the ", "?") {
                kinds.insert("pattern");
                PATTERNS[by_shape(&s).pattern].into()
            } else if let Some(c) = name_of(&q, "is the ", " object big or small?") {
                kinds.insert("size by colour");
                size(by_colour(&c)).into()
            } else if let Some(s) = name_of(&q, "is the ", " big or small?") {
                kinds.insert("size");
                size(by_shape(&s)).into()
            } else if let Some(c) = name_of(&q, "what shape is the ", " object?") {
                kinds.insert("shape");
                SHAPES[by_colour(&c).shape].into()
            } else if let Some(c) = name_of(&q, "is there a ", " object?") {
                kinds.insert("presence");
                if objs.iter().any(|o| COLOURS[o.colour].0 == c) {
                    "yes"
                } else {
                    "no"
                }
                .into()
            } else {
                assert_eq!(q, "how many objects are there?");
                kinds.insert("count");
                ["one", "two", "three"][objs.len() - 1].into()
            };
            assert_eq!(a, expected, "{q} in {objs:?}");
        }
        assert_eq!(kinds.len(), 9, "every kind of question is asked: {kinds:?}");
    }

    #[test]
    fn synthetic_vqa_answers_come_from_the_scene() {
        let t = open_task(
            "synthetic:vqa",
            &TaskOptions {
                synthetic_len: 200,
                ..Default::default()
            },
        )
        .unwrap();
        let vocab = synthetic_vqa_answers();
        assert_eq!(t.examples.len(), 200);
        for e in &t.examples {
            let Some(Target::Answers(a)) = &e.target else {
                panic!("answers")
            };
            assert_eq!(a.len(), 10);
            assert!(vocab.contains(&a[0]), "{}", a[0]);
            assert!(e.text.as_deref().is_some_and(|q| q.ends_with('?')));
        }
        let held = open_task(
            "synthetic:vqa:heldout",
            &TaskOptions {
                synthetic_len: 5,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(held.examples[0].id, t.examples[0].id);
        let top = answer_vocabulary(&t.examples, 3);
        assert_eq!(top.len(), 3);
    }
}
