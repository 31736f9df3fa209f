//! Streams over sources: epochs that restart, skip counting, a resumable position, and the
//! decoding of a raw sample into what its task needs.

use std::collections::BTreeMap;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::processor::{decode_image, to_rgb8};
use crate::sources::{ImageData, RawSample, Record, SkipReason, Source, SourceError, NON_UTF8_MARKER};
use crate::task::Task;

/// Where a stream stands: the epoch and how many records of it were consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamPosition {
    /// Current epoch.
    pub epoch: u64,
    /// Records consumed in it (samples and skips).
    pub consumed: u64,
}

/// Samples delivered and skipped, by reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStats {
    /// Usable samples delivered.
    pub samples: u64,
    /// Skipped samples by reason.
    pub skipped: BTreeMap<SkipReason, u64>,
}

impl StreamStats {
    /// Adds another stream's counts.
    pub fn merge(&mut self, other: &StreamStats) {
        self.samples += other.samples;
        for (k, v) in &other.skipped {
            *self.skipped.entry(*k).or_default() += v;
        }
    }

    /// Total skips.
    pub fn total_skipped(&self) -> u64 {
        self.skipped.values().sum()
    }
}

impl StreamStats {
    /// `CorruptImage: 3, MissingCaption: 1` (or `none`).
    pub fn reasons(&self) -> String {
        if self.skipped.is_empty() {
            return "none".into();
        }
        self.skipped
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Skips logged per reason before the rest are only counted (the end-of-run summary has all).
pub const LOGGED_SKIPS_PER_REASON: u64 = 10;

/// A source read epoch after epoch (or one share of it: every `stride`-th record from `phase`).
pub struct SampleStream {
    source: Box<dyn Source>,
    pos: StreamPosition,
    started: bool,
    phase: u64,
    stride: u64,
    /// Records since the last usable sample (skips in a row).
    unusable_run: u64,
    /// Counts since the stream was opened.
    pub stats: StreamStats,
}

impl SampleStream {
    /// Wraps a source; epoch 0 starts on first use.
    pub fn new(source: Box<dyn Source>) -> Self {
        Self::strided(source, 0, 1)
    }

    /// Share `phase` of `stride` shares of `source`: the records `phase, phase + stride, …` of
    /// each epoch (the others are read and passed over, not decoded). Positions count every
    /// record of the source, so a share resumes exactly.
    pub fn strided(source: Box<dyn Source>, phase: usize, stride: usize) -> Self {
        Self {
            source,
            pos: StreamPosition::default(),
            started: false,
            phase: phase as u64,
            stride: stride.max(1) as u64,
            unusable_run: 0,
            stats: StreamStats::default(),
        }
    }

    /// Description of the source.
    pub fn describe(&self) -> String {
        self.source.describe()
    }

    /// The position of the next record.
    pub fn position(&self) -> StreamPosition {
        self.pos
    }

    /// Moves to `pos` by starting its epoch and passing over `consumed` records (not decoded).
    pub fn seek(&mut self, pos: StreamPosition) -> Result<(), SourceError> {
        self.source.start_epoch(pos.epoch);
        self.started = true;
        self.pos = StreamPosition {
            epoch: pos.epoch,
            consumed: 0,
        };
        for _ in 0..pos.consumed {
            self.next_any()?;
        }
        Ok(())
    }

    /// The next record of this stream's share, moving to the next epoch when one ends. Skips
    /// are counted here and in the log (stderr); a whole epoch without a record of the share is
    /// an error.
    pub fn next_record(&mut self) -> Result<Record, SourceError> {
        let first_epoch = self.pos.epoch;
        loop {
            let r = self.next_any()?;
            // `consumed` now counts the record just read: its index in the epoch is one less.
            if (self.pos.consumed - 1) % self.stride == self.phase {
                return Ok(r);
            }
            // A whole epoch passed (we are two past the first) without a record of this share.
            if self.pos.epoch >= first_epoch + 2 {
                return Err(SourceError::Empty(format!(
                    "{} (share {} of {}: the source has too few records for the data shares)",
                    self.source.describe(),
                    self.phase,
                    self.stride
                )));
            }
        }
    }

    /// The next record of the source, whatever its share.
    fn next_any(&mut self) -> Result<Record, SourceError> {
        if !self.started {
            self.source.start_epoch(self.pos.epoch);
            self.started = true;
        }
        let mut fresh_epoch = self.pos.consumed == 0;
        loop {
            if let Some(r) = self.source.next_record() {
                self.pos.consumed += 1;
                return Ok(r);
            }
            if fresh_epoch {
                return Err(SourceError::Empty(self.source.describe()));
            }
            self.pos = StreamPosition {
                epoch: self.pos.epoch + 1,
                consumed: 0,
            };
            self.source.start_epoch(self.pos.epoch);
            fresh_epoch = true;
        }
    }

    /// Counts a skip and logs the first [`LOGGED_SKIPS_PER_REASON`] of each reason. After
    /// `limits.max_unusable_records` records in a row without a usable sample the source is
    /// declared unusable: an error naming it and the skip reasons, so that a source of only
    /// broken records ends the run instead of looping over it for ever.
    pub fn count_skip(&mut self, reason: SkipReason, key: &str, detail: &str) -> Result<(), SourceError> {
        let n = self.stats.skipped.entry(reason).or_default();
        *n += 1;
        if *n <= LOGGED_SKIPS_PER_REASON {
            log::warn!("skipped {key} ({reason}): {detail}");
            if *n == LOGGED_SKIPS_PER_REASON {
                log::warn!(
                    "(further {reason} skips of {} are counted, not logged)",
                    self.source.describe()
                );
            }
        }
        self.unusable_run += 1;
        let limit = flava_vit::limits::current().max_unusable_records;
        if self.unusable_run >= limit {
            return Err(SourceError::Unusable {
                source_name: self.source.describe(),
                records: self.unusable_run,
                reasons: self.stats.reasons(),
            });
        }
        Ok(())
    }

    /// Counts a usable sample.
    pub fn count_sample(&mut self) {
        self.stats.samples += 1;
        self.unusable_run = 0;
    }
}

/// A decoded sample ready for transforms.
#[derive(Debug, Clone)]
pub struct DecodedSample {
    /// Key.
    pub key: String,
    /// RGB pixels, when the task uses images.
    pub image: Option<RgbImage>,
    /// Caption or text, when the task uses text.
    pub text: Option<String>,
    /// Label, if any.
    pub label: Option<String>,
}

/// Decodes what `task` needs of a raw sample, or says why it must be skipped.
pub fn decode(raw: RawSample, task: Task) -> Result<DecodedSample, (SkipReason, String)> {
    let needs_image = matches!(task, Task::Pairs | Task::Images);
    let needs_text = matches!(task, Task::Pairs | Task::Text);
    let image = if needs_image {
        match raw.image {
            None => return Err((SkipReason::MissingImage, "no image".into())),
            Some(ImageData::Decoded(img)) => Some(img),
            Some(ImageData::Encoded(bytes)) => match decode_image(&bytes) {
                Ok(img) => Some(to_rgb8(&img)),
                Err(e) => return Err((SkipReason::CorruptImage, e.to_string())),
            },
        }
    } else {
        None
    };
    let text = if needs_text {
        match raw.text {
            None => return Err((SkipReason::MissingCaption, "no caption".into())),
            Some(t) if t == NON_UTF8_MARKER => return Err((SkipReason::NonUtf8Text, "text is not UTF-8".into())),
            Some(t) if t.trim().is_empty() => return Err((SkipReason::EmptyCaption, "empty caption".into())),
            Some(t) => Some(t.trim().to_string()),
        }
    } else {
        None
    };
    Ok(DecodedSample {
        key: raw.key,
        image,
        text,
        label: raw.label,
    })
}
