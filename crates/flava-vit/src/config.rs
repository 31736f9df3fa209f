//! `FlavaImageConfig`: the image tower's configuration, read from an HF `config.json` as it is.

use serde::{Deserialize, Serialize};

use crate::encoder::{EncoderConfig, HiddenAct};
use crate::limits::LimitError;

/// Why a model configuration cannot be built: a size over the [`crate::limits`], or values that
/// do not fit together (the message names the fields).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConfig {
    /// A size or the parameter estimate is over a limit.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// Fields that do not fit together, e.g. a hidden size not divisible by the head count.
    #[error("{0}")]
    Rule(String),
}

/// HF `FlavaImageConfig` (model_type `flava_image_model`); every default equals transformers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlavaImageConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub hidden_act: HiddenAct,
    /// Dropout after attention/FFN outputs (0 in FLAVA).
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (0 in FLAVA).
    pub attention_probs_dropout_prob: f64,
    /// Std of the normal initialiser.
    pub initializer_range: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Input resolution (square).
    pub image_size: usize,
    /// Patch size (square; conv kernel = stride).
    pub patch_size: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Whether the tower has a learnable mask token for masked-image modelling.
    pub mask_token: bool,
    /// Size of the visual (dVAE) vocabulary used by the MIM heads.
    pub vocab_size: usize,
}

impl Default for FlavaImageConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
            mask_token: true,
            vocab_size: 8192,
        }
    }
}

impl FlavaImageConfig {
    /// The encoder shape of this tower.
    pub fn encoder(&self) -> EncoderConfig {
        EncoderConfig {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            layer_norm_eps: self.layer_norm_eps,
            qkv_bias: self.qkv_bias,
            hidden_act: self.hidden_act,
            initializer_range: self.initializer_range,
        }
    }

    /// Patches per side at the configured resolution.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Parameters of the image tower (u128: a hostile configuration must not overflow).
    pub fn parameter_estimate(&self) -> u128 {
        let (d, ff, l) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.num_hidden_layers as u128,
        );
        let patches = (self.image_size as u128 / self.patch_size.max(1) as u128).pow(2);
        let patch_embed = self.num_channels as u128 * (self.patch_size as u128).pow(2) * d;
        patch_embed + (patches + 2) * d + l * (4 * d * d + 2 * d * ff + 9 * d + ff)
    }

    /// Number of patches at the configured resolution.
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Checks the invariants the model relies on; the error names the offending field.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        crate::limits::current().check_dims(
            "image_config.",
            &[
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
                ("image_size", self.image_size),
                ("patch_size", self.patch_size),
                ("num_channels", self.num_channels),
                ("vocab_size", self.vocab_size),
            ],
        )?;
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(InvalidConfig::Rule(format!(
                "image_config.hidden_size ({}) must be divisible by image_config.num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(InvalidConfig::Rule(format!(
                "image_config.image_size ({}) must be a multiple of image_config.patch_size ({})",
                self.image_size, self.patch_size
            )));
        }
        Ok(())
    }
}
