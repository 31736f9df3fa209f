//! # flava-data
//!
//! Everything that feeds FLAVA:
//! - [`processor`], [`resample`]: HF `FlavaImageProcessor` reproduced (Pillow-exact resampling,
//!   libjpeg-turbo decoding); [`transforms`]: the two-way random-resized-crop training transform;
//! - [`masking`]: BEiT block masking; [`mlm`]: BERT MLM masking (whole-word optional);
//! - [`task`]: the three batch kinds (pairs, images, text);
//! - [`sources`] (one module per kind), [`synthetic`], [`spec`], [`stream`]: WebDataset shards,
//!   CSV/TSV manifests, COCO captions, ImageFolder trees, text/JSONL files and the built-in
//!   synthetic shapes, opened from a spec, with counted skips of bad samples and resumable
//!   positions; [`shards`]: writing and inspecting shards;
//! - [`batch`]: transforms, masks, tokenization, ITM negatives and collation into tensors;
//!   [`loader`]: the round-robin/weighted task mixer and the prefetching, deterministic loader.

pub mod batch;
pub mod loader;
pub mod masking;
pub mod mlm;
pub mod processor;
pub mod resample;
pub mod shards;
pub mod sources;
pub mod spec;
pub mod stream;
pub mod synthetic;
pub mod task;
pub mod tasks;
pub mod transforms;

pub use masking::{BlockMaskConfig, BlockMaskGenerator};
pub use mlm::{mask_tokens, MlmConfig, MlmMasked};
pub use processor::{ImageProcessor, ImageProcessorConfig, ProcessorError};
pub use spec::{open_source, SourceOptions};
pub use task::Task;
