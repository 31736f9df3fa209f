//! The softmax of attention scores in one pass per row, with the scaling and the key-padding mask
//! folded in: `softmax(scores·scale + mask·f32::MIN)` over the last dimension, exactly HF's
//! arithmetic (the scaled score plus the most negative f32 on a padded key), and its backward
//! `scale · y · (dy − Σ dy·y)` from the saved probabilities. Burn's autodiff composes the same from
//! a multiplication, a mask addition and a five-op softmax, each with its own backward.
//!
//! A NaN score makes its row NaN (Burn's fused attention passed over NaN, which hid a NaN weight
//! from the training loop's non-finite guard; the composed form propagates it, and so does this).

use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::contiguous;
use super::math::exp_nonpositive;

/// Rows per rayon task.
fn rows_per_task(s: usize) -> usize {
    (8192 / s.max(1)).max(1)
}

multiversion!(pub(super) forward_row(x: &[f32], masked: Option<&[bool]>, scale: f32, out: &mut [f32]) {
    // One pass: the scaled (and masked) scores, their lane maxima, and `Σ v·0`, which is NaN
    // exactly when a score is NaN or infinite. The maxima are `if v > m { v } else { m }`, which
    // passes over NaN as `f32::max` does but compiles to one vector max (`f32::max` did not
    // vectorise: this loop ran one element at a time).
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut poison = [0f32; 16];
    let (n, mut max, mut tail_poison) = (x.len(), f32::NEG_INFINITY, 0f32);
    let full = n - n % 16;
    match masked {
        Some(m) => {
            for ((o, x), m) in out[..full].chunks_exact_mut(16).zip(x.chunks_exact(16)).zip(m.chunks_exact(16)) {
                for k in 0..16 {
                    let v = x[k] * scale + if m[k] { f32::MIN } else { 0.0 };
                    o[k] = v;
                    lanes[k] = if v > lanes[k] { v } else { lanes[k] };
                    poison[k] += v * 0.0;
                }
            }
            for i in full..n {
                let v = x[i] * scale + if m[i] { f32::MIN } else { 0.0 };
                out[i] = v;
                max = if v > max { v } else { max };
                tail_poison += v * 0.0;
            }
        }
        None => {
            for (o, x) in out[..full].chunks_exact_mut(16).zip(x.chunks_exact(16)) {
                for k in 0..16 {
                    let v = x[k] * scale;
                    o[k] = v;
                    lanes[k] = if v > lanes[k] { v } else { lanes[k] };
                    poison[k] += v * 0.0;
                }
            }
            for i in full..n {
                let v = x[i] * scale;
                out[i] = v;
                max = if v > max { v } else { max };
                tail_poison += v * 0.0;
            }
        }
    }
    let max = lanes.iter().fold(max, |a, &v| if v > a { v } else { a });
    let poison = poison.iter().sum::<f32>() + tail_poison;
    if poison.is_nan() || !max.is_finite() {
        out.iter_mut().for_each(|o| *o = f32::NAN);
        return;
    }
    let mut sum = [0f32; 16];
    let mut chunks = out.chunks_exact_mut(16);
    for c in &mut chunks {
        for k in 0..16 {
            let t = c[k] - max;
            // Below -87 (a padded key) exp is 0, as in f32 arithmetic; the polynomial clamps there.
            let e = exp_nonpositive(t);
            let e = if t < -87.0 { 0.0 } else { e };
            c[k] = e;
            sum[k] += e;
        }
    }
    let mut total = sum.iter().sum::<f32>();
    for o in chunks.into_remainder() {
        let t = *o - max;
        let e = exp_nonpositive(t);
        *o = if t < -87.0 { 0.0 } else { e };
        total += *o;
    }
    let inv = 1.0 / total;
    for o in out.iter_mut() {
        *o *= inv;
    }
});

multiversion!(pub(super) backward_row(y: &[f32], dy: &[f32], scale: f32, out: &mut [f32]) {
    let mut lanes = [0f32; 16];
    let mut i = 0;
    let n = y.len();
    while i + 16 <= n {
        for k in 0..16 {
            lanes[k] += y[i + k] * dy[i + k];
        }
        i += 16;
    }
    let mut dot = lanes.iter().sum::<f32>();
    while i < n {
        dot += y[i] * dy[i];
        i += 1;
    }
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(dy) {
        *o = scale * y * (g - dot);
    }
});

/// `softmax(x·scale + pad·MIN)` over the last dimension of contiguous f32 scores
/// [batch, heads, queries, keys]; `mask` is empty (no padding) or [batch·keys], true = padded key.
pub(super) fn forward(scores: FlexTensor, scale: f64, mask: &[bool]) -> FlexTensor {
    let shape = burn::backend::TensorMetadata::shape(&scores);
    let dims = shape.clone().dims::<4>();
    let [b, h, q, s] = dims;
    assert!(
        mask.is_empty() || mask.len() == b * s,
        "one mask entry per batch row and key"
    );
    let scores = contiguous(scores);
    let x = scores.as_slice::<f32>().expect("contiguous f32 tensor");
    let mut out = vec![0f32; x.len()];
    let rows = rows_per_task(s);
    out.par_chunks_mut(rows * s.max(1))
        .zip(x.par_chunks(rows * s.max(1)))
        .enumerate()
        .for_each(|(t, (o, x))| {
            for (k, (o, x)) in o.chunks_exact_mut(s).zip(x.chunks_exact(s)).enumerate() {
                let row = t * rows + k;
                let m = (!mask.is_empty()).then(|| {
                    let bi = row / (h * q);
                    &mask[bi * s..(bi + 1) * s]
                });
                forward_row(x, m, scale as f32, o);
            }
        });
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// The gradient of the scores for `grad` of the probabilities `probs` (both [.., keys]).
pub(super) fn backward(probs: FlexTensor, scale: f64, grad: FlexTensor) -> FlexTensor {
    let shape = burn::backend::TensorMetadata::shape(&probs);
    let s = *shape.dims::<4>().last().expect("4-d scores");
    let (probs, grad) = (contiguous(probs), contiguous(grad));
    let y = probs.as_slice::<f32>().expect("contiguous f32 tensor");
    let dy = grad.as_slice::<f32>().expect("contiguous f32 tensor");
    let mut out = vec![0f32; y.len()];
    let block = rows_per_task(s) * s.max(1);
    out.par_chunks_mut(block)
        .zip(y.par_chunks(block))
        .zip(dy.par_chunks(block))
        .for_each(|((o, y), dy)| {
            for ((o, y), dy) in o.chunks_exact_mut(s).zip(y.chunks_exact(s)).zip(dy.chunks_exact(s)) {
                backward_row(y, dy, scale as f32, o);
            }
        });
    FlexTensor::from_data(TensorData::new(out, shape))
}
