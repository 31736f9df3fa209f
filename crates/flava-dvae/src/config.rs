//! `FlavaImageCodebookConfig`: the dVAE image tokenizer's configuration (HF
//! `FlavaImageCodebookConfig`), read from an HF `config.json` as it is.

use serde::{Deserialize, Serialize};

/// HF `FlavaImageCodebookConfig` (model_type `flava_image_codebook`); defaults equal transformers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlavaImageCodebookConfig {
    /// Number of residual groups. HF always builds 4 and uses this only in the post-gain
    /// `1 / (num_groups · num_blocks_per_group)²`.
    pub num_groups: usize,
    /// Input channels.
    pub input_channels: usize,
    /// Residual blocks per group.
    pub num_blocks_per_group: usize,
    /// Width of the first group (then ×2, ×4, ×8).
    pub hidden_size: usize,
    /// Number of visual tokens.
    pub vocab_size: usize,
    /// Whether the codebook is frozen (it is, when it produces MIM targets).
    pub freeze: bool,
    /// Std of the normal initialiser.
    pub initializer_range: f64,
}

impl Default for FlavaImageCodebookConfig {
    fn default() -> Self {
        Self {
            num_groups: 4,
            input_channels: 3,
            num_blocks_per_group: 2,
            hidden_size: 256,
            vocab_size: 8192,
            freeze: true,
            initializer_range: 0.02,
        }
    }
}

impl FlavaImageCodebookConfig {
    /// Checks sizes against [`flava_vit::limits`] before anything is allocated.
    pub fn validate(&self) -> Result<(), flava_vit::InvalidConfig> {
        let limits = flava_vit::limits::current();
        limits.check_dims(
            "",
            &[
                ("num_groups", self.num_groups),
                ("input_channels", self.input_channels),
                ("num_blocks_per_group", self.num_blocks_per_group),
                ("hidden_size", self.hidden_size),
                ("vocab_size", self.vocab_size),
            ],
        )?;
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_blocks_per_group == 0 {
            return Err(flava_vit::InvalidConfig::Rule(
                "vocab_size, hidden_size and num_blocks_per_group must be at least 1".into(),
            ));
        }
        limits.check_parameters("the codebook configuration", self.parameter_estimate())?;
        Ok(())
    }

    /// Parameters of the encoder (an upper estimate: four groups of residual blocks with 3x3
    /// convolutions at widths h, 2h, 4h, 8h; input and output convolutions).
    pub fn parameter_estimate(&self) -> u128 {
        let h = self.hidden_size as u128;
        let blocks = self.num_blocks_per_group as u128;
        let per_group: u128 = [1u128, 2, 4, 8]
            .iter()
            .map(|m| blocks * 4 * 9 * (m * h) * (m * h))
            .sum();
        let io = 49 * self.input_channels as u128 * h + 8 * h * self.vocab_size as u128;
        per_group + io
    }
}
