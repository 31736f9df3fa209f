//! Resource limits for every reader in the workspace, in one place.
//!
//! Each decoder checks its input against these numbers *before* it allocates: image pixels
//! (decompression bombs), tar members and shards, text lines, checkpoint tensors and model
//! configurations. Where the input is data (an image, a caption, a shard member) a breach is a
//! counted skip; where it is a model, a checkpoint or a configuration it is an error.
//!
//! The limits are process-wide: [`current`] reads them, [`set`] replaces them (the `flava`
//! binary sets them from the `[limits]` section of a run's configuration).

use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// A value over one of the [`Limits`], or a limit that is itself unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A configuration size above `max_config_dim`.
    #[error("{what} = {value} is larger than the limit of {max} (limits.max_config_dim)")]
    TooLarge {
        /// The field, e.g. `text_config.hidden_size`.
        what: String,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A model whose estimated size is above `max_parameters`.
    #[error("{what} describes about {estimate} parameters, over the limit of {max} (limits.max_parameters)")]
    TooManyParameters {
        /// What was estimated (`the configuration`, `the codebook configuration`).
        what: String,
        /// The estimate.
        estimate: u128,
        /// The limit.
        max: u64,
    },
    /// A limit set to zero.
    #[error("limits.{0} must be at least 1")]
    Zero(&'static str),
}

/// The limits; [`Limits::default`] suits real datasets and every published FLAVA checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most pixels (width × height) of one decoded image. Pillow's `MAX_IMAGE_PIXELS`
    /// (89,478,485, about 9459 × 9459): 268 MB of RGB.
    pub max_image_pixels: u64,
    /// Most bytes of one tar member (an image or caption inside a WebDataset shard).
    pub max_member_bytes: u64,
    /// Most bytes of one shard's members together (a shard is held in memory while read).
    pub max_shard_bytes: u64,
    /// Most bytes of one text: a line of a text/JSONL file, a caption, a `.txt` member.
    pub max_text_bytes: u64,
    /// Most bytes of a manifest, annotation or text file read whole (CSV, COCO JSON, JSONL).
    pub max_file_bytes: u64,
    /// Records in a row without one usable sample before a source is declared unusable.
    pub max_unusable_records: u64,
    /// Most elements of one checkpoint tensor.
    pub max_tensor_elements: u64,
    /// Most parameters a model configuration may describe (checked before anything is built).
    pub max_parameters: u64,
    /// Largest single size in a model configuration (widths, layers, vocabularies, image side).
    pub max_config_dim: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_image_pixels: 89_478_485,
            max_member_bytes: 256 << 20,
            max_shard_bytes: 4 << 30,
            max_text_bytes: 64 << 10,
            max_file_bytes: 8 << 30,
            max_unusable_records: 1000,
            // flava-full's largest tensor (the MLM decoder) has 23.4 M elements.
            max_tensor_elements: 1 << 32,
            // flava-full has 350 M; a 20 B-parameter model would need 80 GB in f32.
            max_parameters: 20_000_000_000,
            max_config_dim: 1 << 20,
        }
    }
}

static LIMITS: RwLock<Option<Limits>> = RwLock::new(None);

/// The limits in force (the defaults unless [`set`] was called).
pub fn current() -> Limits {
    LIMITS.read().map(|l| l.unwrap_or_default()).unwrap_or_default()
}

/// Replaces the limits for the whole process.
pub fn set(limits: Limits) {
    if let Ok(mut l) = LIMITS.write() {
        *l = Some(limits);
    }
}

impl Limits {
    /// Checks the values themselves (every limit must be at least 1).
    pub fn validate(&self) -> Result<(), LimitError> {
        let fields = [
            ("max_image_pixels", self.max_image_pixels),
            ("max_member_bytes", self.max_member_bytes),
            ("max_shard_bytes", self.max_shard_bytes),
            ("max_text_bytes", self.max_text_bytes),
            ("max_file_bytes", self.max_file_bytes),
            ("max_unusable_records", self.max_unusable_records),
            ("max_tensor_elements", self.max_tensor_elements),
            ("max_parameters", self.max_parameters),
            ("max_config_dim", self.max_config_dim),
        ];
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(LimitError::Zero(name)),
            None => Ok(()),
        }
    }

    /// `Err` naming `what` when `value` exceeds a configuration size limit.
    pub fn check_dim(&self, what: &str, value: u64) -> Result<(), LimitError> {
        if value > self.max_config_dim {
            return Err(LimitError::TooLarge {
                what: what.into(),
                value,
                max: self.max_config_dim,
            });
        }
        Ok(())
    }

    /// `Err` when a model of about `estimate` parameters exceeds `max_parameters`.
    pub fn check_parameters(&self, what: &str, estimate: u128) -> Result<(), LimitError> {
        if estimate > self.max_parameters as u128 {
            return Err(LimitError::TooManyParameters {
                what: what.into(),
                estimate,
                max: self.max_parameters,
            });
        }
        Ok(())
    }
}

impl Limits {
    /// [`Limits::check_dim`] for each `(name, value)`, names prefixed with `prefix`.
    pub fn check_dims(&self, prefix: &str, dims: &[(&str, usize)]) -> Result<(), LimitError> {
        dims.iter()
            .try_for_each(|(name, v)| self.check_dim(&format!("{prefix}{name}"), *v as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_is_refused() {
        Limits::default().validate().unwrap();
        let bad = Limits {
            max_text_bytes: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err(), LimitError::Zero("max_text_bytes"));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("limits.max_text_bytes"));
        assert!(Limits::default().check_dim("hidden_size", 1 << 40).is_err());
        assert!(Limits::default().check_dim("hidden_size", 768).is_ok());
    }
}
