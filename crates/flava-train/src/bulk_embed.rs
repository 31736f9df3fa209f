//! `flava embed --data SOURCE --out DIR`: every sample of a data source embedded in batches,
//! written in clip-retrieval's layout so the output goes straight into autofaiss:
//!
//! ```text
//! DIR/img_emb/img_emb_N.npy         [rows, d] float16 or float32 (pairs and images)
//! DIR/text_emb/text_emb_N.npy       [rows, d] (pairs and text)
//! DIR/metadata/metadata_N.parquet   key, caption, label, source: one row per embedding row
//! DIR/embed_state.json              the settings and how far the run got (parts, records)
//! ```
//!
//! Row i of part N's arrays and metadata is one sample. Parts hold `part_size` samples (the last
//! fewer) and are written whole (temporary file, rename), then the state; a killed run continues
//! after its last complete part, reading the source in the same order (no shuffling) and
//! skipping the records that part covered without decoding them. Unreadable samples are skipped,
//! counted and logged as everywhere in flava-data.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use anyhow::Context;
use burn::prelude::*;
use flava_data::processor::ImageProcessor;
use flava_data::sources::{Record, SkipReason, Source};
use flava_data::spec::{open_source, SourceOptions};
use flava_data::stream::{decode, DecodedSample};
use flava_data::task::Task;
use flava_fusion::{l2_normalize, FlavaModel};
use flava_text::Tokenizer;
use image::DynamicImage;
use ndarray_npy::{WritableElement, WriteDataError, WriteNpyExt};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Which vector of each sample is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FeatureKind {
    /// The contrastive features: the projection of the CLS token (`projection_dim`), as `flava
    /// embed` prints them and HF's `get_image_features(...)[:, 0]`.
    Projected,
    /// The tower's final CLS hidden state (`hidden_size`), before the projection (what linear
    /// probes read).
    Cls,
}

/// The element type of the written arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE half precision (`<f2`), clip-retrieval's default: half the disk and memory of an index.
    F16,
    /// Single precision (`<f4`).
    F32,
}

/// What to embed and how; all but `batch_size` and `max_samples` must match to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkEmbedConfig {
    /// Model directory or Hub id.
    pub model: PathBuf,
    /// Any flava-data source spec (shards, CSV/TSV, `coco:…`, ImageFolder, `.txt`/`.jsonl`, `synthetic…`).
    pub data: String,
    /// Pairs (both embeddings), images or text.
    pub task: Task,
    /// Projected or CLS features.
    pub features: FeatureKind,
    /// L2-normalise each row (what a cosine index wants).
    pub normalize: bool,
    /// Element type on disk.
    pub dtype: Dtype,
    /// Samples per part file.
    pub part_size: usize,
    /// Text length in tokens, `[CLS]` and `[SEP]` included.
    pub max_length: usize,
    /// Samples per model call.
    #[serde(skip)]
    pub batch_size: usize,
    /// Stop after this many samples in all (None: the whole source).
    #[serde(skip)]
    pub max_samples: Option<usize>,
}

impl BulkEmbedConfig {
    /// Defaults for `data` and `model`: pairs, projected, unnormalised f16, parts of 10,000.
    pub fn new(model: impl Into<PathBuf>, data: impl Into<String>) -> Self {
        BulkEmbedConfig {
            model: model.into(),
            data: data.into(),
            task: Task::Pairs,
            features: FeatureKind::Projected,
            normalize: false,
            dtype: Dtype::F16,
            part_size: 10_000,
            max_length: flava_text::DEFAULT_MAX_LENGTH,
            batch_size: 32,
            max_samples: None,
        }
    }
}

/// How far a run got; `embed_state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkEmbedState {
    /// The settings the parts were written with.
    pub config: Option<BulkEmbedConfig>,
    /// Complete parts.
    pub parts: usize,
    /// Source records the complete parts cover (samples and skips).
    pub records: u64,
    /// Samples in the complete parts.
    pub samples: u64,
    /// Records skipped within them.
    pub skipped: u64,
    /// Embedding width.
    pub dim: usize,
    /// Whether the source was read to its end.
    pub finished: bool,
}

/// The state file of an output directory.
pub const STATE_FILE: &str = "embed_state.json";

/// A half-precision element for `.npy` (`<f2`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct F16(pub half::f16);

impl WritableElement for F16 {
    fn type_descriptor() -> py_literal::Value {
        py_literal::Value::String("<f2".into())
    }

    fn write<W: std::io::Write>(&self, mut writer: W) -> Result<(), WriteDataError> {
        writer.write_all(&self.0.to_bits().to_le_bytes())?;
        Ok(())
    }

    fn write_slice<W: std::io::Write>(slice: &[Self], mut writer: W) -> Result<(), WriteDataError> {
        let bytes: Vec<u8> = slice.iter().flat_map(|x| x.0.to_bits().to_le_bytes()).collect();
        writer.write_all(&bytes)?;
        Ok(())
    }
}

/// One embedded sample.
struct Row {
    record: u64,
    image: Vec<f32>,
    text: Vec<f32>,
    key: String,
    caption: Option<String>,
    label: Option<String>,
}

/// What the reader thread sends: decoded samples with their record index, and skips.
enum Read {
    Batch(Vec<(u64, DecodedSample)>),
    Skip(u64),
}

/// Embeds `cfg.data` into `out`. `resume`: continue a run there with the same settings;
/// `force`: delete one and start over; otherwise an existing run is an error.
/// `stop_after_parts` ends the run after that many new parts (as a kill would, for tests and
/// for running in slices). Returns the final state.
pub fn run(
    cfg: &BulkEmbedConfig,
    out: &Path,
    resume: bool,
    force: bool,
    stop_after_parts: Option<usize>,
    device: &Device,
) -> anyhow::Result<BulkEmbedState> {
    if cfg.part_size == 0 || cfg.batch_size == 0 {
        anyhow::bail!("--part-size and --batch-size must be at least 1");
    }
    if cfg.max_length < 2 {
        anyhow::bail!(
            "--max-length must be at least 2 ([CLS] and [SEP]), got {}",
            cfg.max_length
        );
    }
    let state_path = out.join(STATE_FILE);
    let mut state = if state_path.is_file() {
        let text = std::fs::read_to_string(&state_path)?;
        let prev: BulkEmbedState = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an embedding state", state_path.display()))?;
        if force {
            for d in ["img_emb", "text_emb", "metadata"] {
                let p = out.join(d);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                }
            }
            std::fs::remove_file(&state_path)?;
            BulkEmbedState::default()
        } else if !resume {
            anyhow::bail!(
                "{} already holds embeddings ({} parts, {} samples); pass --resume to continue, --force to start over",
                out.display(),
                prev.parts,
                prev.samples
            );
        } else {
            // The serialised settings: batch size and sample budget may change between runs.
            if serde_json::to_value(&prev.config)? != serde_json::to_value(Some(cfg))? {
                anyhow::bail!(
                    "--resume: {} was written with other settings ({}); use the same ones, or --force",
                    out.display(),
                    serde_json::to_string(&prev.config)?
                );
            }
            prev
        }
    } else {
        BulkEmbedState::default()
    };
    state.config = Some(cfg.clone());
    if state.finished {
        log::info!("{}: already complete ({} samples)", out.display(), state.samples);
        return Ok(state);
    }
    for d in ["img_emb", "text_emb", "metadata"] {
        std::fs::create_dir_all(out.join(d))?;
    }

    let model_dir = crate::hub::resolve(&cfg.model).context("--model")?;
    let loaded = flava_fusion::load_flava_model(&model_dir, device)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let max_length = cfg.max_length.min(loaded.config.text_config.max_position_embeddings);
    let wants_image = matches!(cfg.task, Task::Pairs | Task::Images);
    let wants_text = matches!(cfg.task, Task::Pairs | Task::Text);
    let tokenizer = if wants_text {
        Some(crate::embed::find_tokenizer(&model_dir)?)
    } else {
        None
    };
    let processor = crate::embed::find_processor(&model_dir)?;

    let opts = SourceOptions {
        shuffle: false,
        shuffle_buffer: 0,
        ..Default::default()
    };
    let source = open_source(&cfg.data, cfg.task, &opts).with_context(|| format!("opening {}", cfg.data))?;
    let budget = cfg.max_samples.map(|m| (m as u64).saturating_sub(state.samples));
    let rx = spawn_reader(source, cfg.task, state.records, cfg.batch_size, budget);

    let bar = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} embedded {pos} samples ({per_sec}), {msg}")
            .expect("valid template"),
    );
    bar.set_position(state.samples);
    bar.set_message(format!("{} parts written", state.parts));
    let source_name = cfg.data.clone();
    let (mut rows, mut skips): (Vec<Row>, Vec<u64>) = (Vec::new(), Vec::new());
    let mut new_parts = 0usize;
    let stopped = |new_parts: usize| stop_after_parts.is_some_and(|n| new_parts >= n);
    let mut ended = true;
    for msg in rx.iter() {
        match msg {
            Read::Skip(r) => skips.push(r),
            Read::Batch(batch) => {
                let samples: Vec<DecodedSample> = batch.iter().map(|(_, s)| s.clone()).collect();
                let (img, txt) = embed_batch(
                    &loaded.model,
                    tokenizer.as_ref(),
                    &processor,
                    &samples,
                    cfg,
                    max_length,
                    device,
                )?;
                for (i, (record, s)) in batch.into_iter().enumerate() {
                    rows.push(Row {
                        record,
                        image: img.as_ref().map(|m| m[i].clone()).unwrap_or_default(),
                        text: txt.as_ref().map(|m| m[i].clone()).unwrap_or_default(),
                        key: s.key,
                        caption: s.text,
                        label: s.label,
                    });
                }
                bar.inc(samples.len() as u64);
                while rows.len() >= cfg.part_size && !stopped(new_parts) {
                    let part: Vec<Row> = rows.drain(..cfg.part_size).collect();
                    write_part(
                        out,
                        &mut state,
                        part,
                        &mut skips,
                        wants_image,
                        wants_text,
                        &source_name,
                        cfg.dtype,
                    )?;
                    new_parts += 1;
                    bar.set_message(format!("{} parts written", state.parts));
                }
                if stopped(new_parts) {
                    ended = false;
                    break;
                }
            }
        }
    }
    if ended && !rows.is_empty() {
        let part = std::mem::take(&mut rows);
        write_part(
            out,
            &mut state,
            part,
            &mut skips,
            wants_image,
            wants_text,
            &source_name,
            cfg.dtype,
        )?;
    }
    if ended {
        // Skips after the last sample belong to no part; count them once the source is done.
        state.skipped += skips.len() as u64;
        state.records += skips.len() as u64;
        state.finished = cfg.max_samples.is_none();
        save_state(out, &state)?;
    }
    bar.finish_and_clear();
    if state.samples == 0 {
        anyhow::bail!("{}: no usable sample ({} skipped)", cfg.data, state.skipped);
    }
    Ok(state)
}

/// Reads records on its own thread, decodes each batch on rayon's, and sends batches of
/// `batch` decoded samples (with their record indices) and skips, in source order.
fn spawn_reader(
    mut source: Box<dyn Source>,
    task: Task,
    skip_records: u64,
    batch: usize,
    budget: Option<u64>,
) -> Receiver<Read> {
    let (tx, rx) = sync_channel::<Read>(2);
    std::thread::spawn(move || {
        source.start_epoch(0);
        let mut index = 0u64;
        // Records the complete parts already cover: read past, not decoded.
        while index < skip_records {
            if source.next_record().is_none() {
                return;
            }
            index += 1;
        }
        let mut logged = 0usize;
        let mut log_skip = |key: &str, reason: SkipReason, detail: &str| {
            logged += 1;
            if logged <= flava_data::stream::LOGGED_SKIPS_PER_REASON as usize {
                log::warn!("skipped {key} ({reason}): {detail}");
            }
        };
        let mut sent = 0u64;
        loop {
            let mut raw = Vec::with_capacity(batch);
            let mut done = false;
            while raw.len() < batch {
                if budget.is_some_and(|b| sent + raw.len() as u64 >= b) {
                    done = true;
                    break;
                }
                match source.next_record() {
                    None => {
                        done = true;
                        break;
                    }
                    Some(Record::Skipped { reason, key, detail }) => {
                        log_skip(&key, reason, &detail);
                        if tx.send(Read::Skip(index)).is_err() {
                            return;
                        }
                    }
                    Some(Record::Sample(s)) => raw.push((index, s)),
                }
                index += 1;
            }
            let decoded: Vec<(u64, Decoded)> = raw
                .into_par_iter()
                .map(|(i, s)| {
                    let key = s.key.clone();
                    (i, decode(s, task).map_err(|(r, d)| (r, key, d)))
                })
                .collect();
            let mut ok = Vec::with_capacity(decoded.len());
            for (i, d) in decoded {
                match d {
                    Ok(s) => ok.push((i, s)),
                    Err((reason, key, detail)) => {
                        log_skip(&key, reason, &detail);
                        if tx.send(Read::Skip(i)).is_err() {
                            return;
                        }
                    }
                }
            }
            sent += ok.len() as u64;
            if !ok.is_empty() && tx.send(Read::Batch(ok)).is_err() {
                return;
            }
            if done {
                return;
            }
        }
    });
    rx
}

/// A decoded sample, or why it was skipped (reason, key, detail).
type Decoded = Result<DecodedSample, (SkipReason, String, String)>;

/// Image and text vectors of one batch: [batch][d] each, for the towers the task uses.
type Vectors = Option<Vec<Vec<f32>>>;

fn embed_batch(
    model: &FlavaModel,
    tokenizer: Option<&Tokenizer>,
    processor: &ImageProcessor,
    samples: &[DecodedSample],
    cfg: &BulkEmbedConfig,
    max_length: usize,
    device: &Device,
) -> anyhow::Result<(Vectors, Vectors)> {
    let finish = |x: Tensor<2>| -> Vec<Vec<f32>> {
        let x = if cfg.normalize { l2_normalize(x) } else { x };
        let [n, d] = x.dims();
        let v = x.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
        (0..n).map(|i| v[i * d..(i + 1) * d].to_vec()).collect()
    };
    let image = match samples.iter().map(|s| s.image.clone()).collect::<Option<Vec<_>>>() {
        Some(imgs) if matches!(cfg.task, Task::Pairs | Task::Images) => {
            let dynamic: Vec<DynamicImage> = imgs.into_iter().map(DynamicImage::ImageRgb8).collect();
            let pixels = processor.pixel_values(&dynamic, device);
            let x = match cfg.features {
                FeatureKind::Projected => model.image_features(pixels),
                FeatureKind::Cls => model.image_model.forward_cls(pixels, false),
            };
            Some(finish(x))
        }
        _ => None,
    };
    let text = match (tokenizer, matches!(cfg.task, Task::Pairs | Task::Text)) {
        (Some(tok), true) => {
            let texts: Vec<&str> = samples.iter().map(|s| s.text.as_deref().unwrap_or("")).collect();
            let b = tok.encode_batch(&texts, max_length)?;
            let cut = b.truncated.iter().filter(|t| **t).count();
            if cut > 0 {
                log::info!("{cut} text(s) of this batch cut to {max_length} tokens");
            }
            let (ids, mask, _) = b.to_tensors(device);
            let x = match cfg.features {
                FeatureKind::Projected => model.text_features(ids, Some(&mask)),
                FeatureKind::Cls => model.text_model.forward_cls(ids, Some(&mask), None),
            };
            Some(finish(x))
        }
        _ => None,
    };
    Ok((image, text))
}

/// Writes part `state.parts` (arrays, then metadata, each whole), then the state.
#[allow(clippy::too_many_arguments)]
fn write_part(
    out: &Path,
    state: &mut BulkEmbedState,
    rows: Vec<Row>,
    skips: &mut Vec<u64>,
    image: bool,
    text: bool,
    source: &str,
    dtype: Dtype,
) -> anyhow::Result<()> {
    let n = state.parts;
    let end = rows.last().map(|r| r.record + 1).unwrap_or(state.records);
    let covered = skips.iter().filter(|&&s| s < end).count();
    skips.retain(|&s| s >= end);
    if image {
        write_npy(
            &out.join(format!("img_emb/img_emb_{n}.npy")),
            rows.iter().map(|r| &r.image[..]),
            dtype,
        )?;
        state.dim = rows[0].image.len();
    }
    if text {
        write_npy(
            &out.join(format!("text_emb/text_emb_{n}.npy")),
            rows.iter().map(|r| &r.text[..]),
            dtype,
        )?;
        state.dim = rows[0].text.len();
    }
    write_metadata(&out.join(format!("metadata/metadata_{n}.parquet")), &rows, source)?;
    state.parts += 1;
    state.records = end;
    state.samples += rows.len() as u64;
    state.skipped += covered as u64;
    save_state(out, state)
}

fn save_state(out: &Path, state: &BulkEmbedState) -> anyhow::Result<()> {
    flava_vit::atomic::write_file(&out.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())
        .with_context(|| format!("writing {}", out.join(STATE_FILE).display()))
}

/// Writes `path` through a temporary file in the same directory, renamed when complete.
fn atomically(path: &Path, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    write(&tmp).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

fn write_npy<'a>(path: &Path, rows: impl Iterator<Item = &'a [f32]>, dtype: Dtype) -> anyhow::Result<()> {
    let rows: Vec<&[f32]> = rows.collect();
    let d = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    atomically(path, |tmp| {
        let w = BufWriter::new(File::create(tmp)?);
        match dtype {
            Dtype::F32 => ndarray::Array2::from_shape_vec((rows.len(), d), flat)?.write_npy(w)?,
            Dtype::F16 => ndarray::Array2::from_shape_vec(
                (rows.len(), d),
                flat.into_iter().map(|x| F16(half::f16::from_f32(x))).collect(),
            )?
            .write_npy(w)?,
        }
        Ok(())
    })
}

/// The metadata columns: `key`, `caption` and `label` (null when the sample has none), `source`.
pub const METADATA_SCHEMA: &str = "message metadata {
    REQUIRED BYTE_ARRAY key (UTF8);
    OPTIONAL BYTE_ARRAY caption (UTF8);
    OPTIONAL BYTE_ARRAY label (UTF8);
    REQUIRED BYTE_ARRAY source (UTF8);
}";

fn write_metadata(path: &Path, rows: &[Row], source: &str) -> anyhow::Result<()> {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(parquet::schema::parser::parse_message_type(METADATA_SCHEMA)?);
    let props = Arc::new(WriterProperties::builder().build());
    atomically(path, |tmp| {
        let mut writer = SerializedFileWriter::new(File::create(tmp)?, schema, props)?;
        let mut group = writer.next_row_group()?;
        let columns: [Vec<Option<&str>>; 4] = [
            rows.iter().map(|r| Some(r.key.as_str())).collect(),
            rows.iter().map(|r| r.caption.as_deref()).collect(),
            rows.iter().map(|r| r.label.as_deref()).collect(),
            rows.iter().map(|_| Some(source)).collect(),
        ];
        for (i, values) in columns.iter().enumerate() {
            let mut col = group.next_column()?.context("metadata schema has 4 columns")?;
            let present: Vec<ByteArray> = values.iter().flatten().map(|s| ByteArray::from(*s)).collect();
            let optional = i == 1 || i == 2;
            let levels: Vec<i16> = values.iter().map(|v| i16::from(v.is_some())).collect();
            col.typed::<ByteArrayType>()
                .write_batch(&present, optional.then_some(&levels[..]), None)?;
            col.close()?;
        }
        group.close()?;
        writer.close()?;
        Ok(())
    })
}
