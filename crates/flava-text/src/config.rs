//! `FlavaTextConfig`: the text tower's configuration, read from an HF `config.json` as it is.

use flava_vit::{EncoderConfig, HiddenAct};
use serde::{Deserialize, Serialize};

/// HF `FlavaTextConfig` (model_type `flava_text_model`); every default equals transformers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlavaTextConfig {
    /// WordPiece vocabulary size.
    pub vocab_size: usize,
    /// Number of token types (segments).
    pub type_vocab_size: usize,
    /// Longest sequence the position table covers.
    pub max_position_embeddings: usize,
    /// Only `"absolute"` is implemented, as in current transformers.
    pub position_embedding_type: String,
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
    /// Id of `[PAD]`.
    pub pad_token_id: usize,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
}

impl Default for FlavaTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            type_vocab_size: 2,
            max_position_embeddings: 512,
            position_embedding_type: "absolute".into(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            qkv_bias: true,
        }
    }
}

impl FlavaTextConfig {
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

    /// Parameters of the text tower (u128: a hostile configuration must not overflow).
    pub fn parameter_estimate(&self) -> u128 {
        let (d, ff, l) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.num_hidden_layers as u128,
        );
        let embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) as u128 * d;
        embeddings + l * (4 * d * d + 2 * d * ff + 9 * d + ff)
    }

    /// Checks the invariants the model relies on; the error names the offending field.
    pub fn validate(&self) -> Result<(), flava_vit::InvalidConfig> {
        flava_vit::limits::current().check_dims(
            "text_config.",
            &[
                ("vocab_size", self.vocab_size),
                ("type_vocab_size", self.type_vocab_size),
                ("max_position_embeddings", self.max_position_embeddings),
                ("hidden_size", self.hidden_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("num_attention_heads", self.num_attention_heads),
                ("intermediate_size", self.intermediate_size),
            ],
        )?;
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(flava_vit::InvalidConfig::Rule(format!(
                "text_config.hidden_size ({}) must be divisible by text_config.num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(flava_vit::InvalidConfig::Rule(format!(
                "text_config.position_embedding_type `{}` is not supported (only \"absolute\")",
                self.position_embedding_type
            )));
        }
        Ok(())
    }
}
