//! # flava-dvae
//!
//! FLAVA's image tokenizer: the DALL-E dVAE encoder shipped as HF `FlavaImageCodebook`, which turns
//! a 112×112 image into a 14×14 grid of visual tokens, the targets of masked image modelling.
//! This crate will own loading the official codebook, tokenizing images without autograd, and
//! training a dVAE (encoder and decoder) of one's own. For now it holds the configuration that
//! FLAVA checkpoints carry ([`FlavaImageCodebookConfig`]).

pub mod config;

pub use config::FlavaImageCodebookConfig;
