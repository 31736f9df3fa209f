//! Data sources: where samples come from, before decoding.
//!
//! Every source yields [`Record`]s epoch by epoch: a [`RawSample`] (key, undecoded image, text,
//! label) or a counted [`Record::Skipped`]. Finite sources (CSV/TSV manifests, COCO captions, ImageFolder
//! trees, text and JSONL files, the synthetic generator) are lists shuffled per epoch; WebDataset
//! shards stream with a shard shuffle and a sample shuffle buffer. All shuffles are seeded by
//! `(seed, epoch)`, so a position `(epoch, consumed)` identifies the next sample exactly.
//!
//! One module per kind: [`list`] (the shuffled list every finite source becomes), [`manifest`]
//! (CSV/TSV), [`coco`], [`folder`] (ImageFolder), [`texts`] (text and JSONL files), [`braces`]
//! (WebDataset shard patterns), [`webdataset`] (tar shards) and `remote` (shards at `https://`,
//! `s3://` and `gs://` URLs; the `remote` feature, on by default).

pub mod braces;
pub mod coco;
pub mod folder;
pub mod list;
pub mod manifest;
#[cfg(feature = "remote")]
pub mod remote;
pub mod texts;
pub mod webdataset;

pub use braces::{expand_braces, MAX_BRACE_EXPANSION};
pub use coco::read_coco;
pub use folder::read_image_folder;
pub use list::{Entry, ListSource};
pub use manifest::{read_manifest, ManifestColumns};
pub use texts::read_texts;
pub use webdataset::{split_key, ShardSource};

use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Errors that stop a source from starting (bad paths, unreadable manifests).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A pattern or path matched nothing.
    #[error("`{0}` matches no file")]
    NoMatch(String),
    /// A file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The source spec is not understood.
    #[error("cannot tell what kind of source `{0}` is (expected synthetic, a .tar/.tar.gz pattern, .csv/.tsv, a COCO .json (with an image directory), an ImageFolder directory, .txt or .jsonl)")]
    Unknown(String),
    /// The source produced no sample in a whole epoch.
    #[error("source {0} produced no usable sample in a whole epoch")]
    Empty(String),
    /// A file exists but holds no records (a header-only CSV, an empty text file).
    #[error("{0}")]
    NoRecords(String),
    /// A brace pattern is malformed or expands to too many paths.
    #[error("pattern `{pattern}`: {message}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        message: String,
    },
    /// A source yielded only unusable records for too long.
    #[error("source {source_name} yielded no usable sample in {records} records in a row (skipped: {reasons}); check the data, or raise limits.max_unusable_records")]
    Unusable {
        /// The source.
        source_name: String,
        /// Records read since the last usable sample.
        records: u64,
        /// Skips by reason, e.g. `CorruptImage: 998, MissingCaption: 2`.
        reasons: String,
    },
}

/// Undecoded or already decoded image data.
#[derive(Debug, Clone)]
pub enum ImageData {
    /// File bytes (JPEG, PNG, WebP…).
    Encoded(Vec<u8>),
    /// Pixels (the synthetic source).
    Decoded(RgbImage),
}

/// A sample as a source yields it.
#[derive(Debug, Clone)]
pub struct RawSample {
    /// Unique key (shard member stem, file path, row number…).
    pub key: String,
    /// The image, if the sample has one.
    pub image: Option<ImageData>,
    /// The caption or text, if any.
    pub text: Option<String>,
    /// A class label (ImageFolder folder name, `cls` member, synthetic class).
    pub label: Option<String>,
}

/// Why a sample was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SkipReason {
    /// The image file is missing or unreadable.
    UnreadableImage,
    /// The image bytes do not decode.
    CorruptImage,
    /// A sample that needs a caption has none.
    MissingCaption,
    /// The caption is empty or blank.
    EmptyCaption,
    /// The text is not UTF-8.
    NonUtf8Text,
    /// A tar member was cut short (the rest of that shard is skipped).
    TruncatedMember,
    /// A sample that needs an image has none.
    MissingImage,
    /// A JSON field could not be parsed.
    BadJson,
    /// Over a size limit ([`flava_vit::limits`]): an image's pixels, a member's or a text's bytes.
    TooLarge,
    /// A shard that is not a readable tar (or gzip) file.
    BadShard,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

/// What a source yields.
#[derive(Debug, Clone)]
pub enum Record {
    /// A usable raw sample.
    Sample(RawSample),
    /// A skipped one, with its key and details for the log.
    Skipped {
        /// Why.
        reason: SkipReason,
        /// The sample's key or file.
        key: String,
        /// Details.
        detail: String,
    },
}

/// A source of records, epoch by epoch.
pub trait Source: Send {
    /// A short description for logs.
    fn describe(&self) -> String;
    /// Starts epoch `epoch` (reshuffling with `(seed, epoch)`).
    fn start_epoch(&mut self, epoch: u64);
    /// The next record of the current epoch; `None` at its end.
    fn next_record(&mut self) -> Option<Record>;
}

/// The RNG for `(seed, epoch, stream)`: independent streams for shard order, sample order, etc.
pub fn rng_for(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch.wrapping_add(1)));
    r.set_stream(stream);
    r
}
/// Refuses a manifest, annotation or text file larger than `limits.max_file_bytes`.
pub(crate) fn check_file_size(path: &Path) -> Result<(), SourceError> {
    let max = flava_vit::limits::current().max_file_bytes;
    let len = std::fs::metadata(path).map_err(|e| read_err(path, e))?.len();
    if len > max {
        return Err(read_err(
            path,
            format!("{len} bytes, over the limit of {max} (limits.max_file_bytes)"),
        ));
    }
    Ok(())
}

/// A text longer than `limits.max_text_bytes` is skipped, not tokenized whole.
pub(crate) fn text_too_long(len: usize) -> Option<String> {
    let max = flava_vit::limits::current().max_text_bytes;
    (len as u64 > max).then(|| format!("text of {len} bytes, over the limit of {max} (limits.max_text_bytes)"))
}

pub(crate) fn read_err(path: &Path, e: impl std::fmt::Display) -> SourceError {
    SourceError::Read {
        path: path.into(),
        message: e.to_string(),
    }
}

/// True if `spec` is a URL of a remote shard (`http://`, `https://`, `s3://`, `s3a://`, `gs://`).
pub fn is_remote_spec(spec: &str) -> bool {
    let lower = spec.get(..8).unwrap_or(spec).to_ascii_lowercase();
    ["http://", "https://", "s3://", "s3a://", "gs://"]
        .iter()
        .any(|p| lower.starts_with(p))
}

/// File extensions taken as images (ImageFolder files, shard members), in order of preference.
pub(crate) const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Stands for a text that was not valid UTF-8 (counted as `NonUtf8Text` when decoded).
pub const NON_UTF8_MARKER: &str = "\u{0}<non-utf8>\u{0}";
