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
            return Err(SourceError::NoMatch(name));
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
        let image = match &e.image {
            Some(p) => match std::fs::read(p) {
                Ok(b) => Some(ImageData::Encoded(b)),
                Err(err) => {
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
        let img = rec.get(ci).map(|b| base.join(String::from_utf8_lossy(b).as_ref()));
        // Non-UTF-8 captions are kept as lossy text here and rejected at decode time.
        let text = rec.get(cc).map(|b| match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => NON_UTF8_MARKER.to_string(),
        });
        out.push(Entry {
            key: format!("{}:{}", path.display(), row + 2),
            image: img,
            text,
            label: None,
        });
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
        caption: String,
    }
    #[derive(Deserialize)]
    struct Coco {
        images: Vec<Img>,
        annotations: Vec<Ann>,
    }
    let f = File::open(annotations).map_err(|e| read_err(annotations, e))?;
    let coco: Coco = serde_json::from_reader(BufReader::new(f)).map_err(|e| read_err(annotations, e))?;
    let files: BTreeMap<u64, String> = coco.images.into_iter().map(|i| (i.id, i.file_name)).collect();
    Ok(coco
        .annotations
        .into_iter()
        .enumerate()
        .map(|(i, a)| Entry {
            key: format!("coco:{}:{i}", a.image_id),
            image: Some(match files.get(&a.image_id) {
                Some(f) => images.join(f),
                None => images.join(format!("<unknown image id {}>", a.image_id)),
            }),
            text: Some(a.caption),
            label: Some(a.image_id.to_string()),
        })
        .collect())
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
/// field (or `field`).
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<Entry>, SourceError> {
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| read_err(path, e))?;
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let key = format!("{}:{}", path.display(), i + 1);
        let text = match std::str::from_utf8(line) {
            Ok(s) => s.trim_end_matches('\r').to_string(),
            Err(_) => NON_UTF8_MARKER.to_string(),
        };
        if text.trim().is_empty() {
            continue;
        }
        let text = if jsonl && text != NON_UTF8_MARKER {
            // A line without the field becomes an empty text, counted as such when decoded.
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get(field).and_then(|t| t.as_str().map(String::from)))
                .unwrap_or_default()
        } else {
            text
        };
        out.push(Entry {
            key,
            image: None,
            text: Some(text),
            label: None,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// WebDataset shards

/// Expands shell-style braces: `data/{000..099}.tar` (zero-padded numeric ranges) and `{a,b}`.
pub fn expand_braces(pattern: &str) -> Vec<String> {
    let Some(open) = pattern.find('{') else {
        return vec![pattern.to_string()];
    };
    let Some(close) = pattern[open..].find('}').map(|c| open + c) else {
        return vec![pattern.to_string()];
    };
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let items: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(x), Ok(y)) if x <= y => (x..=y).map(|v| format!("{v:0width$}", width = a.len())).collect(),
            _ => vec![format!("{{{body}}}")],
        }
    } else {
        body.split(',').map(String::from).collect()
    };
    items
        .into_iter()
        .flat_map(|i| expand_braces(&format!("{head}{i}{tail}")))
        .collect()
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
        let shards: Vec<PathBuf> = expand_braces(pattern).into_iter().map(PathBuf::from).collect();
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

    /// Reads one shard into grouped records (a truncated member ends it with a skip).
    pub fn read_shard(path: &Path) -> Vec<Record> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                return vec![Record::Skipped {
                    reason: SkipReason::TruncatedMember,
                    key: path.display().to_string(),
                    detail: e.to_string(),
                }]
            }
        };
        let reader: Box<dyn Read> = if path.to_string_lossy().ends_with(".gz") {
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
            Err(e) => {
                return vec![Record::Skipped {
                    reason: SkipReason::TruncatedMember,
                    key: path.display().to_string(),
                    detail: e.to_string(),
                }]
            }
        };
        for entry in entries {
            let mut entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    flush(group.take(), &mut out);
                    out.push(Record::Skipped {
                        reason: SkipReason::TruncatedMember,
                        key: path.display().to_string(),
                        detail: e.to_string(),
                    });
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
            let mut data = Vec::new();
            if let Err(e) = entry.read_to_end(&mut data) {
                flush(group.take(), &mut out);
                out.push(Record::Skipped {
                    reason: SkipReason::TruncatedMember,
                    key: format!("{}:{name}", path.display()),
                    detail: e.to_string(),
                });
                return out;
            }
            let Some((key, ext)) = split_key(&name) else { continue };
            let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
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
