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
//! - [`decoder`]: DALL-E's decoder; [`train`]: training a dVAE of one's own (Gumbel-softmax,
//!   KL annealing, L2 or logit-Laplace, checkpoints and resume, PSNR/perplexity/code usage).

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod train;

pub use checkpoint::{codebook_state_dict, load_codebook, save_codebook, CodebookError};
pub use config::FlavaImageCodebookConfig;
pub use encoder::ImageCodebook;
