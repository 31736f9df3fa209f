//! WebDataset tar shards (`.tar`, `.tar.gz`), local files or `https://` / `s3://` / `gs://` URLs
//! (see [`super::remote`]): members grouped by key into samples, a shard shuffle and a sample
//! shuffle buffer.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[cfg(feature = "remote")]
use super::remote::{RemoteError, RemoteOptions, RemoteReader};
use super::{
    expand_braces, is_remote_spec, rng_for, ImageData, RawSample, Record, SkipReason, Source, SourceError, IMAGE_EXTS,
};

/// WebDataset key and extension of a member path: key = path up to the first dot of the basename.
pub fn split_key(path: &str) -> Option<(&str, &str)> {
    let base_start = path.rfind('/').map_or(0, |i| i + 1);
    let dot = path[base_start..].find('.')? + base_start;
    Some((&path[..dot], &path[dot + 1..]))
}

/// Streams samples from WebDataset tar shards (`.tar` or `.tar.gz`), local or remote.
pub struct ShardSource {
    pattern: String,
    shards: Vec<String>,
    #[cfg(feature = "remote")]
    remote: RemoteOptions,
    seed: u64,
    shuffle_buffer: usize,
    order: Vec<usize>,
    next_shard: usize,
    members: std::vec::IntoIter<Record>,
    buffer: Vec<Record>,
    rng: ChaCha8Rng,
}

impl ShardSource {
    /// Expands `pattern`; every expanded local path must exist. For a URL pattern
    /// (`https://…/{000..099}.tar`, `s3://bucket/…`, `gs://…`) the first shard is checked (one HEAD
    /// request, so a typo or bad credentials fail here) and a missing later one is a counted
    /// `BadShard` skip when its turn comes; remote options come from the environment
    /// ([`RemoteOptions::from_env`]). `shuffle_buffer` 0 keeps shard order.
    pub fn new(pattern: &str, seed: u64, shuffle_buffer: usize) -> Result<Self, SourceError> {
        Self::build(pattern, seed, shuffle_buffer, |_| Ok(()))
    }

    /// As [`ShardSource::new`], with explicit options for remote shards.
    #[cfg(feature = "remote")]
    pub fn with_remote(
        pattern: &str,
        seed: u64,
        shuffle_buffer: usize,
        remote: RemoteOptions,
    ) -> Result<Self, SourceError> {
        Self::build(pattern, seed, shuffle_buffer, move |s| {
            s.remote = remote;
            Ok(())
        })
    }

    fn build(
        pattern: &str,
        seed: u64,
        shuffle_buffer: usize,
        configure: impl FnOnce(&mut Self) -> Result<(), SourceError>,
    ) -> Result<Self, SourceError> {
        let shards = expand_braces(pattern)?;
        let mut s = Self {
            pattern: pattern.into(),
            order: (0..shards.len()).collect(),
            shards: Vec::new(),
            #[cfg(feature = "remote")]
            remote: RemoteOptions::from_env(),
            seed,
            shuffle_buffer,
            next_shard: 0,
            members: Vec::new().into_iter(),
            buffer: Vec::new(),
            rng: rng_for(seed, 0, 3),
        };
        configure(&mut s)?;
        let remote = shards.iter().filter(|p| is_remote_spec(p)).count();
        if remote > 0 {
            if remote < shards.len() {
                return Err(SourceError::Pattern {
                    pattern: pattern.into(),
                    message: "mixes URLs and local paths".into(),
                });
            }
            s.check_first_remote(&shards[0])?;
        } else {
            let missing: Vec<_> = shards.iter().filter(|p| !Path::new(p).is_file()).collect();
            if shards.is_empty() || missing.len() == shards.len() {
                return Err(SourceError::NoMatch(pattern.into()));
            }
            if let Some(m) = missing.first() {
                return Err(SourceError::NoMatch(format!("{pattern} (missing {m})")));
            }
        }
        s.shards = shards;
        Ok(s)
    }

    #[cfg(feature = "remote")]
    fn check_first_remote(&self, url: &str) -> Result<(), SourceError> {
        match super::remote::remote_size(url, &self.remote) {
            Ok(_) => Ok(()),
            Err(RemoteError::NotFound(_)) => Err(SourceError::NoMatch(format!("{} ({url}: not found)", self.pattern))),
            Err(RemoteError::BadUrl { message, .. } | RemoteError::Failed { message, .. }) => Err(SourceError::Read {
                path: url.into(),
                message,
            }),
        }
    }

    #[cfg(not(feature = "remote"))]
    fn check_first_remote(&self, url: &str) -> Result<(), SourceError> {
        Err(SourceError::Read {
            path: url.into(),
            message: "remote shards need flava-data's `remote` feature".into(),
        })
    }

    /// The shards: local paths or URLs, in pattern order.
    pub fn shards(&self) -> &[String] {
        &self.shards
    }

    /// Reads one shard, a local path or a URL (with `remote` options), into grouped records; see
    /// [`ShardSource::read_shard`]. A remote shard that cannot be opened (missing, denied,
    /// unreachable after retries) is one `BadShard` skip; one whose connection is lost for good
    /// part-way ends with a `TruncatedMember` skip, like a cut file.
    #[cfg(feature = "remote")]
    pub fn read_shard_at(location: &str, remote: &RemoteOptions) -> Vec<Record> {
        if !is_remote_spec(location) {
            return Self::read_shard(Path::new(location));
        }
        match RemoteReader::open(location, remote) {
            Ok(r) => Self::read_shard_from(location, Box::new(r)),
            Err(e) => vec![Record::Skipped {
                reason: SkipReason::BadShard,
                key: location.into(),
                detail: e.to_string(),
            }],
        }
    }

    /// Reads one shard, local path or URL, with the default remote options from the environment.
    pub fn read_location(location: &str) -> Vec<Record> {
        #[cfg(feature = "remote")]
        return Self::read_shard_at(location, &RemoteOptions::from_env());
        #[cfg(not(feature = "remote"))]
        Self::read_shard(Path::new(location))
    }

    /// Reads one of this source's shards, with its remote options.
    fn read(&self, location: &str) -> Vec<Record> {
        #[cfg(feature = "remote")]
        return Self::read_shard_at(location, &self.remote);
        #[cfg(not(feature = "remote"))]
        Self::read_shard(Path::new(location))
    }

    /// Reads one shard into grouped records (a truncated member ends it with a skip). Member
    /// sizes are checked from their headers before they are read: a member over
    /// `limits.max_member_bytes` is skipped unread, and a shard whose members add up to more than
    /// `limits.max_shard_bytes` ends there with a skip. A file that is not a tar (or not gzip,
    /// for `.gz`) is one `BadShard` skip.
    pub fn read_shard(path: &Path) -> Vec<Record> {
        let shard_key = path.display().to_string();
        match File::open(path) {
            Ok(f) => Self::read_shard_from(&shard_key, Box::new(f)),
            Err(e) => vec![Record::Skipped {
                reason: SkipReason::BadShard,
                key: shard_key,
                detail: e.to_string(),
            }],
        }
    }

    /// Reads a shard from any byte stream; `name` keys its records and tells gzip by its ending.
    pub fn read_shard_from(name: &str, raw: Box<dyn Read + '_>) -> Vec<Record> {
        let limits = flava_vit::limits::current();
        let shard_key = name.to_string();
        let skip = |reason, key: String, detail: String| Record::Skipped { reason, key, detail };
        let lower = name.to_ascii_lowercase();
        let reader: Box<dyn Read + '_> = if lower.ends_with(".gz") || lower.ends_with(".tgz") {
            Box::new(flate2::read::GzDecoder::new(BufReader::new(raw)))
        } else {
            Box::new(BufReader::new(raw))
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
                    let records = self.read(&self.shards[self.order[self.next_shard]]);
                    self.next_shard += 1;
                    self.members = records.into_iter();
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
