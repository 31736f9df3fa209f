//! Helpers shared by the data tests.

// Each test binary uses a part of these.
#![allow(dead_code)]

use std::path::PathBuf;

use flava_data::batch::{BatchBuilder, BatchConfig};
use flava_data::masking::BlockMaskConfig;
use flava_data::transforms::TrainTransformConfig;
use flava_text::Tokenizer;

/// The fixture WordPiece tokenizer.
pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/tokenizer.json"),
    )
    .unwrap()
}

/// A batch builder for 32-px images on a 4x4 patch grid and 16-token texts.
pub fn builder(batch: usize) -> BatchBuilder {
    let cfg = BatchConfig {
        batch_size: batch,
        transform: TrainTransformConfig {
            image_size: 32,
            codebook_size: 32,
            ..Default::default()
        },
        mask: BlockMaskConfig {
            height: 4,
            width: 4,
            num_masking_patches: 6,
            min_num_patches: 2,
            ..Default::default()
        },
        max_length: 16,
        ..Default::default()
    };
    BatchBuilder::new(cfg, Some(tokenizer())).unwrap()
}
