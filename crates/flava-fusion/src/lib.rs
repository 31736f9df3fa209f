//! # flava-fusion
//!
//! FLAVA's multimodal side and the assembled model:
//! - [`multimodal`]: the fusion encoder (HF `FlavaMultimodalModel`);
//! - [`model`]: [`FlavaModel`]: image, text and fusion towers, contrastive projections and logit
//!   scale, with image/text features and contrastive logits as HF computes them;
//! - [`config`]: [`FlavaConfig`] read from an HF `config.json`, presets `full`, `small`, `tiny`;
//! - [`checkpoint`]: loading HF directories (`FlavaForPreTraining`, `FlavaModel` or standalone
//!   tower keys; `.bin` or `.safetensors`) and saving HF-compatible ones.

pub mod checkpoint;
pub mod config;
pub mod model;
pub mod multimodal;
pub mod tower;

pub use checkpoint::{load_flava_model, save_flava_model, CheckpointError, Pretrained};
pub use config::{ConfigError, FlavaConfig, FlavaMultimodalConfig};
pub use model::{l2_normalize, FlavaInput, FlavaModel, FlavaOutput};
pub use multimodal::MultimodalModel;
pub use tower::{Tower, UnknownTower};
