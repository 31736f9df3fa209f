//! # flava-dvae
//!
//! FLAVA's image tokenizer: the DALL-E dVAE encoder shipped as HF `FlavaImageCodebook`, which turns
//! a 112×112 image into a 14×14 grid of visual tokens, the targets of masked image modelling.
//! - [`encoder`]: the encoder ([`ImageCodebook`]): logits, `tokens` (argmax, row-major, no
//!   autograd) and `probs`;
//! - [`checkpoint`]: loading `facebook/flava-image-codebook`, the codebook inside a FLAVA
//!   pretraining checkpoint, or DALL-E's original key names, and saving in the HF layout;
//! - [`config`]: the configuration, [`FlavaImageCodebookConfig`].
//!
//! - [`decoder`]: DALL-E's decoder; [`dvae`]: a dVAE of one's own (encoder + decoder), its
//!   losses (Gumbel-softmax, KL, code usage, L2 or logit-Laplace), pixel mapping and quality
//!   metrics (PSNR, perplexity, code usage). Its training loop is in `flava-train`.

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod dvae;
pub mod encoder;
mod frozen;

pub use checkpoint::{codebook_state_dict, load_codebook, save_codebook, CodebookError};
pub use config::FlavaImageCodebookConfig;
pub use dvae::DvaeConfigError;
pub use encoder::ImageCodebook;
