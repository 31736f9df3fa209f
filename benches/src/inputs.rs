//! Deterministic benchmark batches. `benches/compare_pytorch.py` builds the same shapes and
//! masks: 40% of the patches masked (`i % 5 < 2` over the flattened `[batch, patches]`), text of
//! [`SEQ`] tokens with every 7th flattened position an MLM target, every 5th pair an ITM
//! negative.

use burn::prelude::*;
use burn::tensor::Distribution;
use clap::ValueEnum;
use flava_fusion::FlavaConfig;
use flava_objectives::{MlmTargets, PretrainingBatch};

/// Text length of the benchmarks.
pub const SEQ: usize = 32;

/// Which pretraining batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTask {
    /// Image + text: ITM, MMM-image, MMM-text, contrastive.
    Pairs,
    /// Images only: MIM.
    Images,
    /// Text only: MLM.
    Text,
}

/// Flattened positions `i < n` with `i % every == 0`.
pub fn positions(n: usize, every: usize) -> Vec<usize> {
    (0..n).filter(|i| i % every == 0).collect()
}

/// A batch of `b` random samples for `task` at the sizes of `cfg` (MIM targets given, so no
/// codebook runs).
pub fn pretraining_batch(cfg: &FlavaConfig, b: usize, task: BenchTask, device: &Device) -> PretrainingBatch {
    let s = cfg.image_config.image_size;
    let grid = s / cfg.image_config.patch_size;
    let p = grid * grid;
    let mut batch = PretrainingBatch::default();
    if task != BenchTask::Text {
        let mask: Vec<bool> = (0..b * p).map(|i| i % 5 < 2).collect();
        batch.pixel_values = Some(Tensor::random([b, 3, s, s], Distribution::Normal(0.0, 1.0), device));
        batch.bool_masked_pos = Some(Tensor::from_data(TensorData::new(mask, [b, p]), device));
        let tgt: Vec<i64> = (0..b * p)
            .map(|i| (i * 7 % cfg.image_config.vocab_size) as i64)
            .collect();
        batch.mim_targets = Some(Tensor::from_data(TensorData::new(tgt, [b, p]), device));
    }
    if task != BenchTask::Images {
        let ids: Vec<i64> = (0..b * SEQ).map(|i| 5 + (i * 13 % 900) as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, SEQ]), device);
        let mlm_pos = positions(b * SEQ, 7);
        batch.input_ids = Some(ids.clone());
        batch.input_ids_masked = Some(ids);
        batch.attention_mask = Some(Tensor::ones([b, SEQ], device));
        batch.mlm = Some(MlmTargets {
            targets: mlm_pos.iter().map(|p| 5 + p * 13 % 900).collect(),
            positions: mlm_pos,
        });
    }
    if task == BenchTask::Pairs {
        batch.itm_labels = Some((0..b).map(|i| usize::from(i % 5 != 0)).collect());
    }
    batch
}
