//! `FlavaConfig` and `FlavaMultimodalConfig`, read from an HF `config.json` as it is, with the
//! presets `full` (= `facebook/flava-full`), `small` and `tiny`.

use std::path::Path;

use flava_dvae::FlavaImageCodebookConfig;
use flava_text::FlavaTextConfig;
use flava_vit::{EncoderConfig, FlavaImageConfig, HiddenAct, InvalidConfig};
use serde::{Deserialize, Serialize};

/// Errors reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A field has the wrong type or the JSON is malformed; `field` is its path (e.g.
    /// `image_config.hidden_size`).
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The file.
        path: std::path::PathBuf,
        /// Dotted path of the field.
        field: String,
        /// What serde said.
        message: String,
    },
    /// The values are inconsistent or over a limit.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] flava_vit::InvalidConfig),
    /// An unknown preset name.
    #[error("unknown preset `{0}` (expected tiny, small, base or full)")]
    UnknownPreset(String),
}

/// HF `FlavaMultimodalConfig` (model_type `flava_multimodal_model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlavaMultimodalConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of layers (6 in flava-full).
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
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Whether a multimodal CLS token is prepended.
    pub use_cls_token: bool,
}

impl Default for FlavaMultimodalConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            qkv_bias: true,
            use_cls_token: true,
        }
    }
}

impl FlavaMultimodalConfig {
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
}

fn default_model_type() -> String {
    "flava".into()
}

/// HF `FlavaConfig` (model_type `flava`): the sub-configurations and the top-level fields, with
/// transformers' defaults. Unknown fields in a `config.json` are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlavaConfig {
    /// Always `"flava"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// The image tower.
    pub image_config: FlavaImageConfig,
    /// The text tower.
    pub text_config: FlavaTextConfig,
    /// The multimodal tower.
    pub multimodal_config: FlavaMultimodalConfig,
    /// The dVAE codebook.
    pub image_codebook_config: FlavaImageCodebookConfig,
    /// Hidden size used by the ITM head's pooler.
    pub hidden_size: usize,
    /// LayerNorm epsilon of the heads.
    pub layer_norm_eps: f64,
    /// Width of the contrastive embeddings.
    pub projection_dim: usize,
    /// Whether `FlavaForPreTraining` builds the codebook.
    pub init_codebook: bool,
    /// Initial `logit_scale` (ln(1/0.07)).
    pub logit_scale_init_value: f64,
    /// Std of the normal initialiser.
    pub initializer_range: f64,
    /// Ignore index of HF's cross-entropy (unused here: losses gather masked positions).
    pub ce_ignore_index: i64,
    /// Weight of the masked image loss.
    pub mim_weight: f64,
    /// Weight of the masked language loss.
    pub mlm_weight: f64,
    /// Weight of the global contrastive loss.
    pub global_contrastive_weight: f64,
    /// Weight of the image-text matching loss.
    pub itm_weight: f64,
    /// Weight of the masked multimodal image loss.
    pub mmm_image_weight: f64,
    /// Weight of the masked multimodal text loss.
    pub mmm_text_weight: f64,
    /// Gradients flow through gathered embeddings of other devices.
    pub global_backprop_contrastive: bool,
    /// Skip the fusion encoder on the unmasked pass.
    pub skip_unmasked_multimodal_encoder: bool,
    /// Whether `FlavaForPreTraining` returns the loss.
    pub return_loss: bool,
    /// Initialisation factor.
    pub initializer_factor: f64,
}

impl Default for FlavaConfig {
    fn default() -> Self {
        Self {
            model_type: default_model_type(),
            image_config: FlavaImageConfig::default(),
            text_config: FlavaTextConfig::default(),
            multimodal_config: FlavaMultimodalConfig::default(),
            image_codebook_config: FlavaImageCodebookConfig::default(),
            hidden_size: 768,
            layer_norm_eps: 1e-12,
            projection_dim: 768,
            init_codebook: true,
            logit_scale_init_value: 2.6592,
            initializer_range: 0.02,
            ce_ignore_index: -100,
            mim_weight: 1.0,
            mlm_weight: 1.0,
            global_contrastive_weight: 1.0,
            itm_weight: 1.0,
            mmm_image_weight: 1.0,
            mmm_text_weight: 1.0,
            global_backprop_contrastive: true,
            skip_unmasked_multimodal_encoder: true,
            return_loss: true,
            initializer_factor: 1.0,
        }
    }
}

impl FlavaConfig {
    /// `facebook/flava-full`: ViT-B/16 at 224 px, BERT-base text, 6 fusion layers (HF defaults).
    pub fn full() -> Self {
        Self::default()
    }

    /// A small model for CPU training: 64-px images, patch 8, hidden 256, 4/4/2 layers.
    pub fn small() -> Self {
        Self::scaled(64, 8, 256, 4, 1024, [4, 4, 2], 1024, 64)
    }

    /// A tiny model for smoke runs and the default `flava pretrain` on 2 CPU cores: 64-px images,
    /// patch 8, hidden 128, 4 heads, FFN 512, 2/2/1 layers.
    pub fn tiny() -> Self {
        Self::scaled(64, 8, 128, 4, 512, [2, 2, 1], 512, 32)
    }

    /// ViT-B-sized towers, like `full` (an alias kept for the trainer's `--preset base`).
    pub fn base() -> Self {
        Self::default()
    }

    /// Looks a preset up by name.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "base" => Ok(Self::base()),
            "full" => Ok(Self::full()),
            other => Err(ConfigError::UnknownPreset(other.into())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn scaled(
        image_size: usize,
        patch: usize,
        hidden: usize,
        heads: usize,
        ffn: usize,
        layers: [usize; 3],
        image_vocab: usize,
        codebook_hidden: usize,
    ) -> Self {
        let image_config = FlavaImageConfig {
            hidden_size: hidden,
            num_hidden_layers: layers[0],
            num_attention_heads: heads,
            intermediate_size: ffn,
            image_size,
            patch_size: patch,
            vocab_size: image_vocab,
            ..Default::default()
        };
        let text_config = FlavaTextConfig {
            hidden_size: hidden,
            num_hidden_layers: layers[1],
            num_attention_heads: heads,
            intermediate_size: ffn,
            max_position_embeddings: 128,
            ..Default::default()
        };
        let multimodal_config = FlavaMultimodalConfig {
            hidden_size: hidden,
            num_hidden_layers: layers[2],
            num_attention_heads: heads,
            intermediate_size: ffn,
            ..Default::default()
        };
        let image_codebook_config = FlavaImageCodebookConfig {
            hidden_size: codebook_hidden,
            vocab_size: image_vocab,
            ..Default::default()
        };
        Self {
            image_config,
            text_config,
            multimodal_config,
            image_codebook_config,
            hidden_size: hidden,
            projection_dim: hidden,
            ..Default::default()
        }
    }

    /// Parses a `config.json` string; `path` is used in error messages only.
    pub fn from_json_str(json: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(json);
        let cfg: Self = serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Field {
            path: path.into(),
            field: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads an HF `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let json = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_json_str(&json, path)
    }

    /// HF-compatible JSON (with `architectures` and `model_type`), loadable by transformers.
    pub fn to_json_pretty(&self, architecture: &str) -> String {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v["architectures"] = serde_json::json!([architecture]);
        v["image_config"]["model_type"] = "flava_image_model".into();
        v["text_config"]["model_type"] = "flava_text_model".into();
        v["multimodal_config"]["model_type"] = "flava_multimodal_model".into();
        v["image_codebook_config"]["model_type"] = "flava_image_codebook".into();
        serde_json::to_string_pretty(&v).expect("json")
    }

    /// Parameters of the model with its pretraining heads and codebook (an upper estimate,
    /// computed before anything is allocated; u128 so a hostile configuration cannot overflow).
    pub fn parameter_estimate(&self) -> u128 {
        let mm = &self.multimodal_config;
        let (d, ff, l) = (
            mm.hidden_size as u128,
            mm.intermediate_size as u128,
            mm.num_hidden_layers as u128,
        );
        let fusion = l * (4 * d * d + 2 * d * ff + 9 * d + ff) + d * d;
        let (di, dt, p) = (
            self.image_config.hidden_size as u128,
            self.text_config.hidden_size as u128,
            self.projection_dim as u128,
        );
        let heads = (self.text_config.vocab_size as u128 + self.image_config.vocab_size as u128) * (d + 1)
            + (di + dt) * (d + p);
        self.image_config.parameter_estimate()
            + self.text_config.parameter_estimate()
            + fusion
            + heads
            + self.image_codebook_config.parameter_estimate()
    }

    /// Checks that the towers fit together; the error names the offending fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.image_config.validate()?;
        self.text_config.validate()?;
        let mm = &self.multimodal_config;
        let limits = flava_vit::limits::current();
        limits
            .check_dims(
                "",
                &[
                    ("multimodal_config.hidden_size", mm.hidden_size),
                    ("multimodal_config.num_hidden_layers", mm.num_hidden_layers),
                    ("multimodal_config.num_attention_heads", mm.num_attention_heads),
                    ("multimodal_config.intermediate_size", mm.intermediate_size),
                    ("hidden_size", self.hidden_size),
                    ("projection_dim", self.projection_dim),
                ],
            )
            .map_err(InvalidConfig::from)?;
        self.image_codebook_config.validate().map_err(|e| match e {
            InvalidConfig::Rule(m) => InvalidConfig::Rule(format!("image_codebook_config: {m}")),
            other => other,
        })?;
        limits
            .check_parameters("the configuration", self.parameter_estimate())
            .map_err(InvalidConfig::from)?;
        if mm.num_attention_heads == 0 || !mm.hidden_size.is_multiple_of(mm.num_attention_heads) {
            return Err(InvalidConfig::Rule(format!(
                "multimodal_config.hidden_size ({}) must be divisible by multimodal_config.num_attention_heads ({})",
                mm.hidden_size, mm.num_attention_heads
            ))
            .into());
        }
        Ok(())
    }
}
