//! Data sources: where samples come from, before decoding.
//!
//! Every source yields [`Record`]s epoch by epoch: a [`RawSample`] (key, undecoded image, text,
//! label) or a counted [`Skip`]. Finite sources (CSV/TSV manifests, COCO captions, ImageFolder
//! trees, text and JSONL files, the synthetic generator) are lists shuffled per epoch; WebDataset
//! shards stream with a shard shuffle and a sample shuffle buffer. All shuffles are seeded by
//! `(seed, epoch)`, so a position `(epoch, consumed)` identifies the next sample exactly.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
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

// ---------------------------------------------------------------------------------------------
// Listed (finite, indexable) sources

/// One entry of a listed source; images are read when the entry is yielded.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Key for logs.
    pub key: String,
    /// Image file, if any.
    pub image: Option<PathBuf>,
    /// Text, if any.
    pub text: Option<String>,
    /// Label, if any.
    pub label: Option<String>,
    /// Set when reading the list already showed that this entry is unusable (a malformed
    /// JSONL line, a null COCO caption): it is yielded as a counted skip.
    pub skip: Option<(SkipReason, String)>,
}

impl Entry {
    /// An entry that will be skipped with `reason`.
    pub fn skipped(key: String, reason: SkipReason, detail: impl Into<String>) -> Self {
        Self {
            key,
            image: None,
            text: None,
            label: None,
            skip: Some((reason, detail.into())),
        }
    }
}

/// A finite list of entries, shuffled per epoch (or kept in order).
pub struct ListSource {
    name: String,
    entries: Vec<Entry>,
    order: Vec<usize>,
    next: usize,
    seed: u64,
    shuffle: bool,
}

impl ListSource {
    /// A source over `entries`; an empty list is an error.
    pub fn new(name: String, entries: Vec<Entry>, seed: u64, shuffle: bool) -> Result<Self, SourceError> {
        if entries.is_empty() {
            return Err(SourceError::NoRecords(format!("{name} holds no records")));
        }
        let order = (0..entries.len()).collect();
        Ok(Self {
            name,
            entries,
            order,
            next: 0,
            seed,
            shuffle,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries (never: `new` rejects it).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Source for ListSource {
    fn describe(&self) -> String {
        format!("{} ({} entries)", self.name, self.entries.len())
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.order = (0..self.entries.len()).collect();
        if self.shuffle {
            self.order.shuffle(&mut rng_for(self.seed, epoch, 1));
        }
        self.next = 0;
    }

    fn next_record(&mut self) -> Option<Record> {
        let e = &self.entries[*self.order.get(self.next)?];
        self.next += 1;
        if let Some((reason, detail)) = &e.skip {
            return Some(Record::Skipped {
                reason: *reason,
                key: e.key.clone(),
                detail: detail.clone(),
            });
        }
        let image = match &e.image {
            Some(p) => match read_image_file(p) {
                Ok(b) => Some(ImageData::Encoded(b)),
                Err((reason, err)) if reason == SkipReason::TooLarge => {
                    return Some(Record::Skipped {
                        reason,
                        key: e.key.clone(),
                        detail: format!("{}: {err}", p.display()),
                    })
                }
                Err((_, err)) => {
                    return Some(Record::Skipped {
                        reason: SkipReason::UnreadableImage,
                        key: e.key.clone(),
                        detail: format!("{}: {err}", p.display()),
                    })
                }
            },
            None => None,
        };
        Some(Record::Sample(RawSample {
            key: e.key.clone(),
            image,
            text: e.text.clone(),
            label: e.label.clone(),
        }))
    }
}

/// Reads an image file, refusing one larger than a tar member may be (the same limit).
fn read_image_file(p: &Path) -> Result<Vec<u8>, (SkipReason, String)> {
    let max = flava_vit::limits::current().max_member_bytes;
    let len = std::fs::metadata(p)
        .map_err(|e| (SkipReason::UnreadableImage, e.to_string()))?
        .len();
    if len > max {
        return Err((
            SkipReason::TooLarge,
            format!("{len} bytes, over the limit of {max} (limits.max_member_bytes)"),
        ));
    }
    std::fs::read(p).map_err(|e| (SkipReason::UnreadableImage, e.to_string()))
}

/// Refuses a manifest, annotation or text file larger than `limits.max_file_bytes`.
fn check_file_size(path: &Path) -> Result<(), SourceError> {
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
fn text_too_long(len: usize) -> Option<String> {
    let max = flava_vit::limits::current().max_text_bytes;
    (len as u64 > max).then(|| format!("text of {len} bytes, over the limit of {max} (limits.max_text_bytes)"))
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> SourceError {
    SourceError::Read {
        path: path.into(),
        message: e.to_string(),
    }
}

/// Column names of a CSV/TSV manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestColumns {
    /// Image path column (relative paths are resolved against the manifest's directory).
    pub image: String,
    /// Caption column.
    pub caption: String,
}

impl Default for ManifestColumns {
    fn default() -> Self {
        Self {
            image: "image".into(),
            caption: "caption".into(),
        }
    }
}

/// Reads a CSV (`,`) or TSV (`\t`, by extension) manifest with a header row.
pub fn read_manifest(path: &Path, cols: &ManifestColumns) -> Result<Vec<Entry>, SourceError> {
    check_file_size(path)?;
    let tsv = path.extension().is_some_and(|e| e == "tsv");
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(if tsv { b'\t' } else { b',' })
        .flexible(true)
        .from_path(path)
        .map_err(|e| read_err(path, e))?;
    let headers = rdr.headers().map_err(|e| read_err(path, e))?.clone();
    let find = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            read_err(
                path,
                format!(
                    "no column `{name}` (columns: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let (ci, cc) = (find(&cols.image)?, find(&cols.caption)?);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (row, rec) in rdr.byte_records().enumerate() {
        let rec = rec.map_err(|e| read_err(path, e))?;
        let key = format!("{}:{}", path.display(), row + 2);
        if let Some(detail) = rec.get(cc).and_then(|b| text_too_long(b.len())) {
            out.push(Entry::skipped(key, SkipReason::TooLarge, detail));
            continue;
        }
        let img = rec.get(ci).map(|b| base.join(String::from_utf8_lossy(b).as_ref()));
        // Non-UTF-8 captions are kept as lossy text here and rejected at decode time.
        let text = rec.get(cc).map(|b| match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => NON_UTF8_MARKER.to_string(),
        });
        out.push(Entry {
            key,
            image: img,
            text,
            label: None,
            skip: None,
        });
    }
    if out.is_empty() {
        return Err(SourceError::NoRecords(format!(
            "{} has a header but no rows",
            path.display()
        )));
    }
    Ok(out)
}

/// Stands for a text that was not valid UTF-8 (counted as `NonUtf8Text` when decoded).
pub const NON_UTF8_MARKER: &str = "\u{0}<non-utf8>\u{0}";

/// Reads COCO captions (`annotations/captions_*.json` + image directory): one entry per caption.
pub fn read_coco(annotations: &Path, images: &Path) -> Result<Vec<Entry>, SourceError> {
    #[derive(Deserialize)]
    struct Img {
        id: u64,
        file_name: String,
    }
    #[derive(Deserialize)]
    struct Ann {
        image_id: u64,
        // Any JSON value: a null or non-string caption skips that record, not the whole file.
        #[serde(default)]
        caption: serde_json::Value,
    }
    #[derive(Deserialize)]
    struct Coco {
        images: Vec<Img>,
        annotations: Vec<Ann>,
    }
    check_file_size(annotations)?;
    let f = File::open(annotations).map_err(|e| read_err(annotations, e))?;
    let coco: Coco = serde_json::from_reader(BufReader::new(f)).map_err(|e| read_err(annotations, e))?;
    let files: BTreeMap<u64, String> = coco.images.into_iter().map(|i| (i.id, i.file_name)).collect();
    let out: Vec<Entry> = coco
        .annotations
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let key = format!("coco:{}:{i}", a.image_id);
            let Some(file) = files.get(&a.image_id) else {
                return Entry::skipped(
                    key,
                    SkipReason::MissingImage,
                    format!("no entry with id {} in `images`", a.image_id),
                );
            };
            let caption = match a.caption {
                serde_json::Value::String(c) => c,
                serde_json::Value::Null => {
                    return Entry::skipped(key, SkipReason::MissingCaption, "the caption is null or absent")
                }
                other => {
                    return Entry::skipped(
                        key,
                        SkipReason::BadJson,
                        format!("the caption is not a string: {other}"),
                    )
                }
            };
            if let Some(detail) = text_too_long(caption.len()) {
                return Entry::skipped(key, SkipReason::TooLarge, detail);
            }
            Entry {
                key,
                image: Some(images.join(file)),
                text: Some(caption),
                label: Some(a.image_id.to_string()),
                skip: None,
            }
        })
        .collect();
    if out.is_empty() {
        return Err(SourceError::NoRecords(format!(
            "{} has no annotations",
            annotations.display()
        )));
    }
    Ok(out)
}

const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads an ImageFolder tree (`root/<class>/<image>`): entries labelled by folder, classes sorted.
pub fn read_image_folder(root: &Path) -> Result<(Vec<Entry>, Vec<String>), SourceError> {
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| read_err(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for c in &classes {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(c))
            .map_err(|e| read_err(&root.join(c), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|p| Entry {
            key: p.display().to_string(),
            image: Some(p),
            text: None,
            label: Some(c.clone()),
            skip: None,
        }));
    }
    if out.is_empty() {
        return Err(SourceError::NoMatch(format!(
            "{} (no class folders with images)",
            root.display()
        )));
    }
    Ok((out, classes))
}

/// Reads a text file with one sample per line (blank lines are skipped), or JSONL with a `text`
/// field (or `field`). Lines are read in bounded pieces: one longer than `limits.max_text_bytes`
/// becomes a counted skip without being held whole; a malformed JSONL line is a `BadJson` skip,
/// one without the field a `MissingCaption` skip.
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<Entry>, SourceError> {
    use std::io::BufRead;
    check_file_size(path)?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let max = flava_vit::limits::current().max_text_bytes as usize;
    let mut reader = BufReader::new(File::open(path).map_err(|e| read_err(path, e))?);
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut lineno = 0usize;
    loop {
        // Read one line, keeping at most `max + 1` bytes of it.
        line.clear();
        let mut len = 0usize;
        let mut ended = false;
        loop {
            let buf = reader.fill_buf().map_err(|e| read_err(path, e))?;
            if buf.is_empty() {
                break;
            }
            let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], true),
                None => (buf, false),
            };
            let keep = chunk.len().min((max + 1).saturating_sub(line.len()));
            line.extend_from_slice(&chunk[..keep]);
            len += chunk.len();
            let consumed = chunk.len() + usize::from(found);
            reader.consume(consumed);
            if found {
                ended = true;
                break;
            }
        }
        if !ended && len == 0 {
            break;
        }
        lineno += 1;
        let key = format!("{}:{lineno}", path.display());
        if len > max {
            out.push(Entry::skipped(
                key,
                SkipReason::TooLarge,
                format!("line of {len} bytes, over the limit of {max} (limits.max_text_bytes)"),
            ));
            continue;
        }
        let text = match std::str::from_utf8(&line) {
            Ok(s) => s.trim_end_matches('\r').to_string(),
            Err(_) => NON_UTF8_MARKER.to_string(),
        };
        if text.trim().is_empty() {
            continue;
        }
        let text = if jsonl && text != NON_UTF8_MARKER {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Err(e) => {
                    out.push(Entry::skipped(
                        key,
                        SkipReason::BadJson,
                        format!("not a JSON line: {e}"),
                    ));
                    continue;
                }
                Ok(v) => match v.get(field) {
                    Some(serde_json::Value::String(t)) => t.clone(),
                    Some(other) => {
                        out.push(Entry::skipped(
                            key,
                            SkipReason::BadJson,
                            format!("field `{field}` is not a string: {other}"),
                        ));
                        continue;
                    }
                    None => {
                        out.push(Entry::skipped(
                            key,
                            SkipReason::MissingCaption,
                            format!("no `{field}` field"),
                        ));
                        continue;
                    }
                },
            }
        } else {
            text
        };
        out.push(Entry {
            key,
            image: None,
            text: Some(text),
            label: None,
            skip: None,
        });
        if !ended {
            break;
        }
    }
    if out.is_empty() {
        return Err(SourceError::NoRecords(format!(
            "{} has no non-blank lines",
            path.display()
        )));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// WebDataset shards

/// Most paths one brace pattern may expand to.
pub const MAX_BRACE_EXPANSION: u64 = 1_000_000;

/// Expands shell-style braces as WebDataset does: `data/{000..099}.tar` (numeric ranges, zero
/// padded to the width of the first bound, ascending or descending), `{a..e}` (letter ranges) and
/// `{a,b}` (alternatives); several groups multiply. Nested or unbalanced braces, empty bounds and
/// expansions past [`MAX_BRACE_EXPANSION`] paths are errors (checked before anything is built).
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, SourceError> {
    let err = |message: String| SourceError::Pattern {
        pattern: pattern.into(),
        message,
    };
    // Parse into literal pieces and groups of alternatives, without recursion.
    enum Part<'a> {
        Lit(&'a str),
        Range { start: u64, end: u64, width: usize },
        Letters(u8, u8),
        Alts(Vec<&'a str>),
    }
    let mut parts = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(err("`}` without `{`".into()));
        }
        parts.push(Part::Lit(&rest[..open]));
        let after = &rest[open + 1..];
        let close = after.find(['{', '}']).ok_or_else(|| err("`{` without `}`".into()))?;
        if after.as_bytes()[close] == b'{' {
            return Err(err("nested braces are not supported".into()));
        }
        let body = &after[..close];
        rest = &after[close + 1..];
        if let Some((a, b)) = body.split_once("..") {
            if a.is_empty() || b.is_empty() {
                return Err(err(format!("range `{{{body}}}` needs both bounds")));
            }
            match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(start), Ok(end)) => parts.push(Part::Range {
                    start,
                    end,
                    width: a.len(),
                }),
                _ if a.len() == 1
                    && b.len() == 1
                    && a.as_bytes()[0].is_ascii_alphabetic()
                    && b.as_bytes()[0].is_ascii_alphabetic() =>
                {
                    parts.push(Part::Letters(a.as_bytes()[0], b.as_bytes()[0]))
                }
                _ => {
                    return Err(err(format!(
                        "range `{{{body}}}`: bounds must be numbers (or single letters)"
                    )))
                }
            }
        } else {
            parts.push(Part::Alts(body.split(',').collect()));
        }
    }
    parts.push(Part::Lit(rest));
    let count = parts.iter().try_fold(1u64, |n, p| {
        let k = match p {
            Part::Lit(_) => 1,
            Part::Range { start, end, .. } => start.abs_diff(*end) + 1,
            Part::Letters(a, b) => a.abs_diff(*b) as u64 + 1,
            Part::Alts(v) => v.len() as u64,
        };
        n.checked_mul(k).filter(|&n| n <= MAX_BRACE_EXPANSION)
    });
    if count.is_none() {
        return Err(err(format!("expands to more than {MAX_BRACE_EXPANSION} paths")));
    }
    let mut out = vec![String::new()];
    for p in &parts {
        let items: Vec<String> = match p {
            Part::Lit(l) => vec![l.to_string()],
            Part::Range { start, end, width } => {
                let step = |v: u64| format!("{v:0width$}", width = *width);
                if start <= end {
                    (*start..=*end).map(step).collect()
                } else {
                    (*end..=*start).rev().map(step).collect()
                }
            }
            Part::Letters(a, b) => {
                if a <= b {
                    (*a..=*b).map(|c| (c as char).to_string()).collect()
                } else {
                    (*b..=*a).rev().map(|c| (c as char).to_string()).collect()
                }
            }
            Part::Alts(v) => v.iter().map(|s| s.to_string()).collect(),
        };
        out = out
            .iter()
            .flat_map(|prefix| items.iter().map(move |i| format!("{prefix}{i}")))
            .collect();
    }
    Ok(out)
}

/// WebDataset key and extension of a member path: key = path up to the first dot of the basename.
pub fn split_key(path: &str) -> Option<(&str, &str)> {
    let base_start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[base_start..].find('.')? + base_start;
    Some((&path[..dot], &path[dot + 1..]))
}

/// Streams samples from WebDataset tar shards (`.tar` or `.tar.gz`).
pub struct ShardSource {
    pattern: String,
    shards: Vec<PathBuf>,
    seed: u64,
    shuffle_buffer: usize,
    order: Vec<usize>,
    next_shard: usize,
    members: std::vec::IntoIter<Record>,
    buffer: Vec<Record>,
    rng: ChaCha8Rng,
}

impl ShardSource {
    /// Expands `pattern`; every expanded path must exist. `shuffle_buffer` 0 keeps shard order.
    pub fn new(pattern: &str, seed: u64, shuffle_buffer: usize) -> Result<Self, SourceError> {
        let shards: Vec<PathBuf> = expand_braces(pattern)?.into_iter().map(PathBuf::from).collect();
        let missing: Vec<_> = shards.iter().filter(|p| !p.is_file()).collect();
        if shards.is_empty() || missing.len() == shards.len() {
            return Err(SourceError::NoMatch(pattern.into()));
        }
        if let Some(m) = missing.first() {
            return Err(SourceError::NoMatch(format!("{pattern} (missing {})", m.display())));
        }
        Ok(Self {
            pattern: pattern.into(),
            order: (0..shards.len()).collect(),
            shards,
            seed,
            shuffle_buffer,
            next_shard: 0,
            members: Vec::new().into_iter(),
            buffer: Vec::new(),
            rng: rng_for(seed, 0, 3),
        })
    }

    /// The shard files.
    pub fn shards(&self) -> &[PathBuf] {
        &self.shards
    }

    /// Reads one shard into grouped records (a truncated member ends it with a skip). Member
    /// sizes are checked from their headers before they are read: a member over
    /// `limits.max_member_bytes` is skipped unread, and a shard whose members add up to more than
    /// `limits.max_shard_bytes` ends there with a skip. A file that is not a tar (or not gzip,
    /// for `.gz`) is one `BadShard` skip.
    pub fn read_shard(path: &Path) -> Vec<Record> {
        let limits = flava_vit::limits::current();
        let shard_key = path.display().to_string();
        let skip = |reason, key: String, detail: String| Record::Skipped { reason, key, detail };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return vec![skip(SkipReason::BadShard, shard_key, e.to_string())],
        };
        let reader: Box<dyn Read> =
            if path.to_string_lossy().ends_with(".gz") || path.to_string_lossy().ends_with(".tgz") {
                Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
            } else {
                Box::new(BufReader::new(file))
            };
        let mut archive = tar::Archive::new(reader);
        let mut out = Vec::new();
        let mut group: Option<(String, BTreeMap<String, Vec<u8>>)> = None;
        let flush = |g: Option<(String, BTreeMap<String, Vec<u8>>)>, out: &mut Vec<Record>| {
            if let Some((key, files)) = g {
                out.push(group_to_record(key, files));
            }
        };
        let entries = match archive.entries() {
            Ok(e) => e,
            Err(e) => return vec![skip(SkipReason::BadShard, shard_key, e.to_string())],
        };
        let mut total: u64 = 0;
        // The key of a sample that lost a member to a limit: its other members are dropped too.
        let mut dropped: Option<String> = None;
        for (members, entry) in entries.enumerate() {
            let mut entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    flush(group.take(), &mut out);
                    // Nothing readable at all: the file is not a tar (or not gzip).
                    let reason = if members == 0 {
                        SkipReason::BadShard
                    } else {
                        SkipReason::TruncatedMember
                    };
                    out.push(skip(reason, shard_key, e.to_string()));
                    return out;
                }
            };
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = match entry.path() {
                Ok(p) => p.to_string_lossy().into_owned(),
                Err(_) => continue,
            };
            let size = entry.header().size().unwrap_or(u64::MAX);
            total = total.saturating_add(size);
            if total > limits.max_shard_bytes {
                flush(group.take(), &mut out);
                out.push(skip(
                    SkipReason::TooLarge,
                    format!("{shard_key}:{name}"),
                    format!(
                        "the shard's members exceed {} bytes (limits.max_shard_bytes); the rest of the shard is skipped",
                        limits.max_shard_bytes
                    ),
                ));
                return out;
            }
            let Some((key, ext)) = split_key(&name) else { continue };
            let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
            let text_member = matches!(ext.as_str(), "txt" | "json" | "cls");
            let max = if text_member {
                limits.max_text_bytes
            } else {
                limits.max_member_bytes
            };
            if dropped.as_deref() == Some(key.as_str()) {
                continue;
            }
            if size > max {
                // Not read: the next header is found by skipping the member's bytes.
                if group.as_ref().is_some_and(|(k, _)| *k != key) {
                    flush(group.take(), &mut out);
                }
                group = None;
                dropped = Some(key.clone());
                out.push(skip(
                    SkipReason::TooLarge,
                    format!("{shard_key}:{name}"),
                    format!("member of {size} bytes, over the limit of {max}"),
                ));
                continue;
            }
            let mut data = Vec::with_capacity(size as usize);
            if let Err(e) = (&mut entry).take(size).read_to_end(&mut data) {
                flush(group.take(), &mut out);
                out.push(skip(
                    SkipReason::TruncatedMember,
                    format!("{shard_key}:{name}"),
                    e.to_string(),
                ));
                return out;
            }
            if (data.len() as u64) < size {
                flush(group.take(), &mut out);
                out.push(skip(
                    SkipReason::TruncatedMember,
                    format!("{shard_key}:{name}"),
                    format!("member cut short: {} of {size} bytes", data.len()),
                ));
                return out;
            }
            match &mut group {
                Some((k, files)) if *k == key => {
                    files.insert(ext, data);
                }
                _ => {
                    flush(group.take(), &mut out);
                    group = Some((key, BTreeMap::from([(ext, data)])));
                }
            }
        }
        flush(group.take(), &mut out);
        out
    }
}

fn group_to_record(key: String, mut files: BTreeMap<String, Vec<u8>>) -> Record {
    let image = IMAGE_EXTS.iter().find_map(|e| files.remove(*e)).map(ImageData::Encoded);
    let mut text = None;
    if let Some(t) = files.remove("txt") {
        match String::from_utf8(t) {
            Ok(s) => text = Some(s),
            Err(_) => {
                return Record::Skipped {
                    reason: SkipReason::NonUtf8Text,
                    key,
                    detail: "txt member is not UTF-8".into(),
                }
            }
        }
    } else if let Some(j) = files.remove("json") {
        match serde_json::from_slice::<serde_json::Value>(&j) {
            Ok(v) => {
                text = ["caption", "text"]
                    .iter()
                    .find_map(|f| v.get(*f).and_then(|t| t.as_str().map(String::from)))
            }
            Err(e) => {
                return Record::Skipped {
                    reason: SkipReason::BadJson,
                    key,
                    detail: e.to_string(),
                }
            }
        }
    }
    let label = files
        .remove("cls")
        .map(|b| String::from_utf8_lossy(&b).trim().to_string());
    Record::Sample(RawSample {
        key,
        image,
        text,
        label,
    })
}

impl Source for ShardSource {
    fn describe(&self) -> String {
        format!("shards {} ({} files)", self.pattern, self.shards.len())
    }

    fn start_epoch(&mut self, epoch: u64) {
        self.order = (0..self.shards.len()).collect();
        if self.shuffle_buffer > 0 {
            self.order.shuffle(&mut rng_for(self.seed, epoch, 2));
        }
        self.rng = rng_for(self.seed, epoch, 3);
        self.next_shard = 0;
        self.members = Vec::new().into_iter();
        self.buffer.clear();
    }

    fn next_record(&mut self) -> Option<Record> {
        // Fill the shuffle buffer, then emit a random element of it (webdataset's scheme).
        while self.buffer.len() < self.shuffle_buffer.max(1) {
            match self.members.next() {
                Some(r) => self.buffer.push(r),
                None if self.next_shard < self.order.len() => {
                    let path = &self.shards[self.order[self.next_shard]];
                    self.next_shard += 1;
                    self.members = Self::read_shard(path).into_iter();
                }
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let i = if self.shuffle_buffer > 1 {
            self.rng.random_range(0..self.buffer.len())
        } else {
            0
        };
        Some(self.buffer.swap_remove(i))
    }
}
