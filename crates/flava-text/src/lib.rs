//! # flava-text
//!
//! FLAVA's text side in Burn:
//! - [`model`]: BERT-style embeddings and the text encoder (HF `FlavaTextModel`), built on the
//!   shared pre-LN encoder of `flava-vit`;
//! - [`tokenizer`]: the BERT uncased WordPiece tokenizer on the `tokenizers` crate, loading an HF
//!   `tokenizer.json` or a `vocab.txt`;
//! - [`train`]: training a WordPiece tokenizer of one's own on a corpus (deterministic ids);
//! - [`config`]: `FlavaTextConfig`, read from an HF `config.json` as it is.

pub mod config;
pub mod model;
pub mod tokenizer;
pub mod train;

pub use config::FlavaTextConfig;
pub use model::{TextEmbeddings, TextModel};
pub use tokenizer::{SpecialTokens, TokenizedBatch, Tokenizer, TokenizerError, DEFAULT_MAX_LENGTH};
