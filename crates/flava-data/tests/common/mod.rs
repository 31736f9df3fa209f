//! Helpers shared by the data tests.

// Each test binary uses a part of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

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

/// Writes a tar of `members` (name, bytes) to `path`, its last `cut` bytes cut off (a truncated
/// shard) when given.
pub fn write_tar(path: &Path, members: &[(&str, Vec<u8>)], cut: Option<usize>) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let mut bytes = b.into_inner().unwrap();
    if let Some(n) = cut {
        bytes.truncate(bytes.len() - n);
    }
    std::fs::write(path, bytes).unwrap();
}
