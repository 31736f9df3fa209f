//! LayerNorm over the last dimension: one pass forward (mean and variance of each row, then the
//! affine output; under autodiff it keeps the row statistics) and one backward (from the saved
//! input and statistics, the input gradient row by row, the weight and bias gradients summed per
//! block of rows and then over blocks). Burn's autodiff composes LayerNorm from nine
//! differentiable ops (two reductions, seven element-wise passes, each with its own backward).

use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{contiguous, written_f32};

/// Rows per rayon task: whole rows, and enough of them to be worth a task at d = 128.
fn rows_per_task(d: usize) -> usize {
    (8192 / d.max(1)).max(1)
}

/// `(mean_hi, mean_lo, 1/√(var + eps))` of one row: the mean in f64 split into two f32 (so that
/// `(v − hi) − lo` is the deviation to ~1e-7 relative; the f32 mean alone of values near 50 is
/// off by up to ulp(50)/2 = 1.9e-6, which every output of the row would carry); the variance is
/// the mean square deviation from the mean (two passes, not `E[x²] − E[x]²`), sums in f64 lanes.
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32, f32) {
    let d = row.len() as f64;
    let mean = lane_sum(row, |v| v as f64) / d;
    let var = lane_sum(row, |v| {
        let c = v as f64 - mean;
        c * c
    }) / d;
    let hi = mean as f32;
    let lo = (mean - hi as f64) as f32;
    (hi, lo, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// `Σ f(v)` over `row` in 8 independent f64 lanes, so that the compiler vectorises the loop (a
/// single accumulator must be added in order and stays scalar).
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f64>() + rest
}

// Writes the rows of `out` and, when `stats` is not empty, each row's `[mean_hi, mean_lo, rstd]`.
multiversion!(forward_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32], stats: &mut [f32]) {
    let d = gamma.len();
    for (i, (row, o)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let (hi, lo, rstd) = row_stats(row, eps);
        if !stats.is_empty() {
            stats[3 * i..3 * i + 3].copy_from_slice(&[hi, lo, rstd]);
        }
        for (((o, &v), &g), &b) in o.iter_mut().zip(row).zip(gamma).zip(beta) {
            *o = ((v - hi) - lo) * rstd * g + b;
        }
    }
});

// Writes `dx` for the rows of `x`/`dy` (with their forward `stats`, 3 per row) and adds their
// contributions to `dgamma` and `dbeta`.
multiversion!(backward_rows(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    stats: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32]
) {
    let d = gamma.len();
    let inv_d = 1.0 / d as f32;
    let rows = x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
    for (((row, g_row), o), st) in rows.zip(stats.chunks_exact(3)) {
        let (hi, lo, rstd) = (st[0], st[1], st[2]);
        // a = mean(dy·γ), b = mean(dy·γ·x̂), with x̂ = (x − mean)·rstd.
        // Lane sums over whole chunks of 16 (zipped chunks, so that the loop vectorises: indexed
        // it ran one element at a time, through the stack), then the tail.
        let mut la = [0f32; 16];
        let mut lb = [0f32; 16];
        let full = d - d % 16;
        for ((r, g), gm) in row[..full]
            .chunks_exact(16)
            .zip(g_row[..full].chunks_exact(16))
            .zip(gamma[..full].chunks_exact(16))
        {
            for k in 0..16 {
                let xh = ((r[k] - hi) - lo) * rstd;
                let dyg = g[k] * gm[k];
                la[k] += dyg;
                lb[k] += dyg * xh;
            }
        }
        let (mut a, mut b) = (0f32, 0f32);
        for ((&r, &g), &gm) in row[full..].iter().zip(&g_row[full..]).zip(&gamma[full..]) {
            let xh = ((r - hi) - lo) * rstd;
            let dyg = g * gm;
            a += dyg;
            b += dyg * xh;
        }
        let a = (la.iter().sum::<f32>() + a) * inv_d;
        let b = (lb.iter().sum::<f32>() + b) * inv_d;
        for (((((o, &r), &gy), &gm), dg), db) in o
            .iter_mut()
            .zip(row)
            .zip(g_row)
            .zip(gamma)
            .zip(dgamma.iter_mut())
            .zip(dbeta.iter_mut())
        {
            let xh = ((r - hi) - lo) * rstd;
            *o = rstd * (gy * gm - a - xh * b);
            *dg += gy * xh;
            *db += gy;
        }
    }
});

/// LayerNorm of contiguous f32 `x` (any shape, last dimension d) with `gamma`, `beta` [d]; with
/// `keep_stats`, also each row's `[mean_hi, mean_lo, rstd]` ([rows, 3]) for [`backward`], which
/// would otherwise recompute them (two of its four passes over each row).
pub(super) fn forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    eps: f64,
    keep_stats: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let shape = burn::backend::TensorMetadata::shape(&x);
    let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
    let xs = x.as_slice::<f32>().expect("contiguous f32 tensor");
    let g = gamma.as_slice::<f32>().expect("contiguous f32 tensor");
    let b = beta.as_slice::<f32>().expect("contiguous f32 tensor");
    let d = g.len();
    let rows = xs.len() / d.max(1);
    let per_task = rows_per_task(d);
    let mut stats = if keep_stats { vec![0f32; 3 * rows] } else { Vec::new() };
    // SAFETY: the blocks cover the output and `forward_rows` writes every element of each row
    // (x has whole rows of d), reading none.
    let (out, ()) = unsafe {
        written_f32(xs.len(), |out| {
            let blocks = out.par_chunks_mut(per_task * d).zip(xs.par_chunks(per_task * d));
            if keep_stats {
                blocks
                    .zip(stats.par_chunks_mut(3 * per_task))
                    .for_each(|((o, x), st)| forward_rows(x, g, b, eps as f32, o, st));
            } else {
                blocks.for_each(|(o, x)| forward_rows(x, g, b, eps as f32, o, &mut []));
            }
        })
    };
    let stats = keep_stats.then(|| FlexTensor::from_data(TensorData::new(stats, [rows, 3])));
    (FlexTensor::from_data(TensorData::new(out, shape)), stats)
}

/// `(dx, dgamma, dbeta)` of [`forward`] for the upstream gradient `grad` (the shape of `x`),
/// with the row statistics `stats` [rows, 3] the forward kept.
pub(super) fn backward(
    x: FlexTensor,
    gamma: FlexTensor,
    stats: FlexTensor,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = burn::backend::TensorMetadata::shape(&x);
    let (x, gamma, grad, stats) = (contiguous(x), contiguous(gamma), contiguous(grad), contiguous(stats));
    let xs = x.as_slice::<f32>().expect("contiguous f32 tensor");
    let g = gamma.as_slice::<f32>().expect("contiguous f32 tensor");
    let dy = grad.as_slice::<f32>().expect("contiguous f32 tensor");
    let st = stats.as_slice::<f32>().expect("contiguous f32 tensor");
    let d = g.len();
    assert_eq!(st.len() * d, 3 * xs.len(), "three statistics per row");
    let per_task = rows_per_task(d);
    let block = per_task * d;
    // SAFETY: the blocks cover dx and `backward_rows` writes every element of each row (x and
    // dy have whole rows of d), reading none of dx.
    let (dx, (dgamma, dbeta)) = unsafe {
        written_f32(xs.len(), |dx| {
            dx.par_chunks_mut(block)
                .zip(xs.par_chunks(block))
                .zip(dy.par_chunks(block))
                .zip(st.par_chunks(3 * per_task))
                .map(|(((o, x), dy), st)| {
                    let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
                    backward_rows(x, dy, g, st, o, &mut dg, &mut db);
                    (dg, db)
                })
                .reduce(
                    || (vec![0f32; d], vec![0f32; d]),
                    |(mut g1, mut b1), (g2, b2)| {
                        g1.iter_mut().zip(&g2).for_each(|(a, b)| *a += b);
                        b1.iter_mut().zip(&b2).for_each(|(a, b)| *a += b);
                        (g1, b1)
                    },
                )
        })
    };
    (
        FlexTensor::from_data(TensorData::new(dx, shape)),
        FlexTensor::from_data(TensorData::new(dgamma, [d])),
        FlexTensor::from_data(TensorData::new(dbeta, [d])),
    )
}
