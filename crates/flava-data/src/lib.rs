//! # flava-data
//!
//! Everything that feeds FLAVA: image preprocessing reproducing HF `FlavaImageProcessor`
//! ([`processor`]); later also data sources (WebDataset shards, CSV, COCO, ImageFolder, text),
//! BEiT block masking, MLM masking and the round-robin dataset mixer.

pub mod batch;
pub mod loader;
pub mod masking;
pub mod mlm;
pub mod processor;
pub mod resample;
pub mod sources;
pub mod stream;
pub mod synthetic;
pub mod transforms;

pub use masking::{BlockMaskConfig, BlockMaskGenerator};
pub use mlm::{mask_tokens, MlmConfig, MlmMasked};
pub use processor::{ImageProcessor, ImageProcessorConfig, ProcessorError};
