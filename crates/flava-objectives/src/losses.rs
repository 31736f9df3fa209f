//! Cross-entropy on gathered positions, and the gathering itself. No `-100` targets: callers
//! select the masked positions first, so the heads never see unmasked tokens.

use burn::prelude::*;
use flava_vit::kernels::cross_entropy_rows;

/// Integer index tensor from host positions: [n].
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
/// `targets`: n class indices (each < classes). Returns a [1] tensor.
pub fn cross_entropy_sum(logits: Tensor<2>, targets: &[usize]) -> Tensor<1> {
    // One fused pass on flex (flava_vit::kernels), Burn's log_softmax + gather elsewhere.
    cross_entropy_rows(logits, targets).sum()
}

/// Mean token cross-entropy (PyTorch `F.cross_entropy` with `reduction="mean"`), [1].
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
