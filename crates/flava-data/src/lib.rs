//! # flava-data
//!
//! Everything that feeds FLAVA: image preprocessing reproducing HF `FlavaImageProcessor`
//! ([`processor`]); later also data sources (WebDataset shards, CSV, COCO, ImageFolder, text),
//! BEiT block masking, MLM masking and the round-robin dataset mixer.

pub mod processor;
pub mod resample;

pub use processor::{ImageProcessor, ImageProcessorConfig, ProcessorError};
