//! Opening a source from its command-line spec (`synthetic`, `data/{000..009}.tar`,
//! `coco:ANN.json:DIR`, a CSV/TSV manifest, an ImageFolder directory, a text or JSONL file).

use std::path::Path;

use crate::sources::{
    read_coco, read_image_folder, read_manifest, read_texts, ListSource, ManifestColumns, ShardSource, Source,
    SourceError,
};
use crate::synthetic::{Split, SyntheticKind, SyntheticSource};
use crate::task::Task;

/// Options for opening sources.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Shuffle seed.
    pub seed: u64,
    /// WebDataset sample shuffle buffer (0 = in order).
    pub shuffle_buffer: usize,
    /// Shuffle listed sources each epoch.
    pub shuffle: bool,
    /// Manifest column names.
    pub columns: ManifestColumns,
    /// JSONL text field.
    pub text_field: String,
    /// Samples per epoch of the synthetic source.
    pub synthetic_len: u64,
    /// Side of synthetic images.
    pub synthetic_image_size: u32,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            shuffle_buffer: 1000,
            shuffle: true,
            columns: ManifestColumns::default(),
            text_field: "text".into(),
            synthetic_len: 20_000,
            synthetic_image_size: 64,
        }
    }
}

/// Opens a source from its spec, for `task`:
/// `synthetic` (or `synthetic:heldout`, `synthetic:classes`), a shard pattern (`.tar`, `.tar.gz`,
/// braces allowed; local, or `https://`, `s3://`, `gs://` URLs), a `.csv`/`.tsv` manifest, `coco:ANNOTATIONS.json:IMAGE_DIR`, an ImageFolder
/// directory, a `.txt` file (one text per line) or `.jsonl`.
pub fn open_source(spec: &str, task: Task, opts: &SourceOptions) -> Result<Box<dyn Source>, SourceError> {
    let seed = opts.seed;
    if let Some(rest) = spec.strip_prefix("synthetic") {
        let kind = match task {
            Task::Pairs => SyntheticKind::Pairs,
            Task::Images => SyntheticKind::Images,
            Task::Text => SyntheticKind::Text,
        };
        let (kind, split) = match rest {
            "" | ":train" => (kind, Split::Train),
            ":heldout" => (kind, Split::HeldOut),
            ":classes" => (SyntheticKind::Classes, Split::ZeroShot),
            _ => return Err(SourceError::Unknown(spec.into())),
        };
        return Ok(Box::new(SyntheticSource::new(
            kind,
            split,
            seed,
            opts.synthetic_len,
            opts.synthetic_image_size,
        )));
    }
    if let Some(rest) = spec.strip_prefix("coco:") {
        let (ann, dir) = rest.rsplit_once(':').ok_or_else(|| SourceError::Unknown(spec.into()))?;
        let entries = read_coco(Path::new(ann), Path::new(dir))?;
        return Ok(Box::new(ListSource::new(spec.into(), entries, seed, opts.shuffle)?));
    }
    let lower = spec.to_ascii_lowercase();
    if crate::sources::is_remote_spec(spec)
        && !(lower.ends_with(".tar") || lower.ends_with(".tar.gz") || lower.ends_with(".tgz"))
    {
        return Err(SourceError::Pattern {
            pattern: spec.into(),
            message: "only WebDataset shards (.tar, .tar.gz) are read from URLs".into(),
        });
    }
    if lower.ends_with(".tar") || lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
        return Ok(Box::new(ShardSource::new(spec, seed, opts.shuffle_buffer)?));
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(SourceError::NoMatch(spec.into()));
    }
    let entries = if path.is_dir() {
        read_image_folder(path)?.0
    } else if lower.ends_with(".csv") || lower.ends_with(".tsv") {
        read_manifest(path, &opts.columns)?
    } else if lower.ends_with(".txt") || lower.ends_with(".jsonl") {
        read_texts(path, &opts.text_field)?
    } else {
        return Err(SourceError::Unknown(spec.into()));
    };
    Ok(Box::new(ListSource::new(spec.into(), entries, seed, opts.shuffle)?))
}
