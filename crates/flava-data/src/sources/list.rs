//! The listed (finite, indexable) source every CSV, COCO, ImageFolder and text source becomes:
//! entries shuffled per epoch, images read when an entry is yielded.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;

use super::{rng_for, ImageData, RawSample, Record, SkipReason, Source, SourceError};

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
