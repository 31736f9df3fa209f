//! The losses of the heads, one type each returning `{loss, logits}` (as torchmultimodal's
//! `MaskedPredictionLoss` and `ITMLoss`): [`MaskedPredictionLoss`] for MIM, MLM, MMM-image and
//! MMM-text, [`ItmLoss`]; the contrastive one is in [`crate::contrastive`]. Below them,
//! cross-entropy on gathered positions and the gathering itself. No `-100` targets: callers
//! select the masked positions first, so the heads never see unmasked tokens.

use burn::prelude::*;
use flava_vit::kernels::cross_entropy_rows;

use crate::heads::{ItmHead, MaskedPredictionHead};

/// A loss and the logits it was computed from.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The mean loss, `[1]`.
    pub loss: Tensor<1>,
    /// The head's logits on the counted positions, [n, classes].
    pub logits: Tensor<2>,
}

/// Cross-entropy of a masked-prediction head on chosen positions: MIM and MMM-image (visual
/// tokens), MLM and MMM-text (word pieces).
#[derive(Debug, Clone, Copy)]
pub struct MaskedPredictionLoss<'a> {
    /// The head.
    pub head: &'a MaskedPredictionHead,
}

impl MaskedPredictionLoss<'_> {
    /// `states` [b, s, hidden]; `positions` flat `b·s + j` with their `targets`; the sum of the
    /// cross-entropies over `denominator` (the whole batch's count). `None` without positions.
    pub fn forward(
        &self,
        states: Tensor<3>,
        positions: &[usize],
        targets: &[usize],
        denominator: usize,
    ) -> Option<LossOutput> {
        if positions.is_empty() {
            return None;
        }
        let logits = self.head.forward(gather_positions(states, positions));
        let loss = cross_entropy_sum(logits.clone(), targets) / denominator.max(1) as f64;
        Some(LossOutput { loss, logits })
    }
}

/// Image-text matching: the ITM head on the multimodal CLS, cross-entropy against the labels.
#[derive(Debug, Clone, Copy)]
pub struct ItmLoss<'a> {
    /// The head.
    pub head: &'a ItmHead,
}

/// What [`ItmLoss`] returns: the logits always, the loss when there are labels.
#[derive(Debug, Clone)]
pub struct ItmOutput {
    /// Sum of cross-entropies over `denominator`, `[1]`; `None` without labels.
    pub loss: Option<Tensor<1>>,
    /// [b, 2].
    pub logits: Tensor<2>,
}

impl ItmLoss<'_> {
    /// `multimodal` [b, s, hidden] (CLS first); `labels` one per pair (1 = matching).
    pub fn forward(&self, multimodal: Tensor<3>, labels: Option<&[usize]>, denominator: usize) -> ItmOutput {
        let logits = self.head.forward(multimodal);
        let loss = labels.map(|l| cross_entropy_sum(logits.clone(), l) / denominator.max(1) as f64);
        ItmOutput { loss, logits }
    }
}

/// Integer index tensor from host positions: `[n]`.
pub fn index_tensor(positions: &[usize], device: &Device) -> Tensor<1, Int> {
    let data: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
    Tensor::from_data(TensorData::new(data, [positions.len()]), device)
}

/// Rows of `states` [batch, seq, hidden] at flat positions `b·seq + s` → [n, hidden], in the
/// order given (row-major order reproduces HF's boolean-mask selection).
pub fn gather_positions(states: Tensor<3>, positions: &[usize]) -> Tensor<2> {
    let [b, s, d] = states.dims();
    let device = states.device();
    states.reshape([b * s, d]).select(0, index_tensor(positions, &device))
}

/// Sum of token cross-entropies: `Σ_i −log softmax(logits_i)[target_i]`. `logits`: [n, classes],
/// `targets`: n class indices (each < classes). Returns a `[1]` tensor.
pub fn cross_entropy_sum(logits: Tensor<2>, targets: &[usize]) -> Tensor<1> {
    // One fused pass on flex (flava_vit::kernels), Burn's log_softmax + gather elsewhere.
    cross_entropy_rows(logits, targets).sum()
}

/// Mean token cross-entropy (PyTorch `F.cross_entropy` with `reduction="mean"`), `[1]`.
pub fn cross_entropy(logits: Tensor<2>, targets: &[usize]) -> Tensor<1> {
    let n = targets.len().max(1) as f64;
    cross_entropy_sum(logits, targets) / n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_floats([[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]], &device);
        // −log softmax: row 0 target 2, row 1 target 0.
        let l0 = -(3.0f64 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln());
        let l1 = -(0.5f64 - (2.0 * 0.5f64.exp() + (-1f64).exp()).ln());
        let got: f32 = cross_entropy(logits, &[2, 0]).into_scalar();
        assert!((got as f64 - (l0 + l1) / 2.0).abs() < 1e-6, "{got}");
    }

    #[test]
    fn gather_positions_is_row_major() {
        let device = Device::flex();
        let states = Tensor::<1, Int>::arange(0..24, &device).float().reshape([2, 3, 4]);
        let got = gather_positions(states, &[1, 3, 5])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let want: Vec<f32> = [4..8, 12..16, 20..24].into_iter().flatten().map(|v| v as f32).collect();
        assert_eq!(got, want);
    }
}
