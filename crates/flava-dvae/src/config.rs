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
