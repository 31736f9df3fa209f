//! One pretraining batch on the device, with its host-side MLM and ITM targets.

use burn::prelude::*;

/// Host-side MLM targets: flat positions `b·seq + s` (row-major) and their original token ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MlmTargets {
    /// Flat positions of the masked tokens.
    pub positions: Vec<usize>,
    /// Original ids at those positions.
    pub targets: Vec<usize>,
}

impl MlmTargets {
    /// From HF-style labels (row-major [batch, seq], `ignore` where not masked).
    pub fn from_labels(labels: &[i64], ignore: i64) -> Self {
        let (positions, targets) = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != ignore)
            .map(|(i, &l)| (i, l as usize))
            .unzip();
        Self { positions, targets }
    }
}

/// One batch of one task. Present fields decide the losses (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct PretrainingBatch {
    /// [batch, 3, H, W] normalised pixels.
    pub pixel_values: Option<Tensor<4>>,
    /// [batch, num_patches], `true` = masked patch.
    pub bool_masked_pos: Option<Tensor<2, Bool>>,
    /// [batch, 3, 8·grid, 8·grid] codebook pixels (`0.8·x + 0.1`), for targets from the codebook.
    pub codebook_pixel_values: Option<Tensor<4>>,
    /// [batch, num_patches] visual-token targets; computed by the codebook when absent.
    pub mim_targets: Option<Tensor<2, Int>>,
    /// [batch, seq] unmasked token ids (contrastive pass).
    pub input_ids: Option<Tensor<2, Int>>,
    /// [batch, seq] token ids with MLM masking applied (masked pass); `input_ids` when absent.
    pub input_ids_masked: Option<Tensor<2, Int>>,
    /// [batch, seq], 1 = token, 0 = padding.
    pub attention_mask: Option<Tensor<2, Int>>,
    /// [batch, seq] segment ids.
    pub token_type_ids: Option<Tensor<2, Int>>,
    /// Masked token positions and targets.
    pub mlm: Option<MlmTargets>,
    /// Per pair: 1 = matching, 0 = ITM negative.
    pub itm_labels: Option<Vec<usize>>,
}

impl PretrainingBatch {
    /// Number of samples.
    pub fn batch_size(&self) -> usize {
        if let Some(px) = &self.pixel_values {
            return px.dims()[0];
        }
        self.input_ids
            .as_ref()
            .or(self.input_ids_masked.as_ref())
            .map_or(0, |t| t.dims()[0])
    }

    /// Whether both modalities are present.
    pub fn is_paired(&self) -> bool {
        self.pixel_values.is_some() && (self.input_ids.is_some() || self.input_ids_masked.is_some())
    }

    /// Host copy of the patch mask: (flat `b·P + p` → masked, P).
    pub fn masked_patches(&self) -> Option<(Vec<bool>, usize)> {
        self.bool_masked_pos.as_ref().map(|m| {
            let p = m.dims()[1];
            let v = m
                .clone()
                .into_data()
                .convert::<bool>()
                .try_to_vec::<bool>()
                .unwrap_or_default();
            (v, p)
        })
    }
}
