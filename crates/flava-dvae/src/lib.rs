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
//! The decoder and dVAE training come with the rest of the dVAE issue.

pub mod checkpoint;
pub mod config;
pub mod encoder;

pub use checkpoint::{load_codebook, save_codebook, CodebookError};
pub use config::FlavaImageCodebookConfig;
pub use encoder::ImageCodebook;
