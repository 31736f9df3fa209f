//! Row-wise softmax cross-entropy: one pass forward (max, then the sum of exp), one backward
//! (`softmax − one-hot`, recomputed from the saved logits).

use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::math::exp_nonpositive;
use super::{contiguous, written_f32};

/// Per-row `logsumexp − logit[target]` of contiguous f32 logits [n, classes] → [n].
pub(super) fn forward(logits: FlexTensor, targets: &[usize]) -> FlexTensor {
    let logits = contiguous(logits);
    let x = logits.as_slice::<f32>().expect("contiguous f32 tensor");
    let n = targets.len();
    let classes = x.len() / n.max(1);
    let loss: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| {
            let row = &x[i * classes..(i + 1) * classes];
            let (max, log_sum) = softmax_stats(row);
            (max - row[targets[i]]) + log_sum
        })
        .collect();
    FlexTensor::from_data(TensorData::new(loss, [n]))
}

/// `grad_i · (softmax(logits_i) − onehot(target_i))`, [n, classes].
pub(super) fn backward(logits: FlexTensor, targets: &[usize], grad: FlexTensor) -> FlexTensor {
    let logits = contiguous(logits);
    let grad = contiguous(grad);
    let x = logits.as_slice::<f32>().expect("contiguous f32 tensor");
    let g = grad.as_slice::<f32>().expect("contiguous f32 tensor");
    let n = targets.len();
    let classes = x.len() / n.max(1);
    // SAFETY: the rows cover the output; `scaled_softmax_slice` writes each element of its row
    // before the target's is read back.
    let (out, ()) = unsafe {
        written_f32(x.len(), |out| {
            out.par_chunks_mut(classes.max(1)).enumerate().for_each(|(i, o)| {
                let row = &x[i * classes..(i + 1) * classes];
                let (max, log_sum) = softmax_stats(row);
                scaled_softmax_slice(row, max, log_sum, g[i], o);
                o[targets[i]] -= g[i];
            })
        })
    };
    let shape = burn::backend::TensorMetadata::shape(&logits);
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// `(max_j row_j, log Σ_j exp(row_j − max))`: the log-sum-exp in two parts, so that callers
/// subtract the maximum first (exactly, for nearby values) and the small log-sum second. Folded
/// into one f32 first, it would carry an error of ulp(max): 8e-6 for contrastive logits at scale
/// 100, which showed in the projections' gradients.
pub(super) fn softmax_stats(row: &[f32]) -> (f32, f32) {
    let max = row_max(row);
    if !max.is_finite() {
        // A NaN or infinite logit: the loss is not defined (the training loop's guard skips it).
        return (f32::NAN, f32::NAN);
    }
    (max, row_sum_exp(row, max).ln())
}

// One pass: lane maxima as `if v > m { v } else { m }` (one vector max; `f32::max` did not
// vectorise), and lane flags of `is_nan` in the same loop, since the comparisons pass over NaN
// and a NaN logit must give a NaN loss.
multiversion!(row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut nan = [0u32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            let v = c[k];
            lanes[k] = if v > lanes[k] { v } else { lanes[k] };
            nan[k] |= v.is_nan() as u32;
        }
    }
    let mut m = f32::NEG_INFINITY;
    let mut any_nan = nan.iter().any(|&f| f != 0);
    for &v in chunks.remainder() {
        m = if v > m { v } else { m };
        any_nan |= v.is_nan();
    }
    for l in lanes {
        m = if l > m { l } else { m };
    }
    if any_nan { f32::NAN } else { m }
});

multiversion!(row_sum_exp(row: &[f32], max: f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += exp_nonpositive(v - max);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&v| exp_nonpositive(v - max)).sum();
    lanes.iter().sum::<f32>() + rest
});

multiversion!(scaled_softmax_slice(row: &[f32], max: f32, log_sum: f32, g: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(row) {
        *o = g * exp_nonpositive((v - max) - log_sum);
    }
});
