//! Multi-head attention in one kernel per direction, with the heads read from and written to the
//! projections' own layout: `q`, `k`, `v` and the context are [batch, seq, hidden] with head `h`
//! in columns `h·dh .. (h+1)·dh`, as the query/key/value Linears produce them and the output
//! Linear takes them. Per (sample, head), in parallel over both:
//!
//! - forward: `scores = q·kᵀ` (one gemm on strided views, no head-split copies), the scaled,
//!   masked softmax of [`super::softmax`] row by row into the saved probabilities `p`, then
//!   `ctx = p·v` written in place into the context's columns of that head;
//! - backward: `dp = dctx·vᵀ`, `dv = pᵀ·dctx`, `ds = scale·p·(dp − Σ dp·p)`, `dq = ds·k`,
//!   `dk = dsᵀ·q`: five gemms, again on strided views.
//!
//! Burn's composed form (`reshape`/`swap_dims` to [batch, heads, seq, dh], a batched matmul, the
//! softmax, a batched matmul, and back) copies every head split and runs its batched matmul one
//! small gemm at a time; for `full` image embedding (96 [197, 64]·[64, 197] products per layer)
//! that was about a third of the gap to PyTorch.

use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::blas::{sgemm, Threads, View};
use super::contiguous;
use super::softmax::{backward_row, forward_row};

/// `dst[m×n] = a[m×k] · b[k×n]` (overwritten), single-threaded (the callers run in parallel),
/// on the process's sgemm backend ([`super::blas`]).
///
/// # Safety
/// Every element (r, c) the shapes and strides reach must be in bounds of its buffer, and `dst`
/// must not overlap `a` or `b` nor be written by another thread at the same elements.
unsafe fn matmul(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: isize, a: View, b: View) {
    // SAFETY: the caller's contract.
    unsafe { sgemm(m, n, k, dst, dst_rs, a, b, false, Threads::One) }
}

/// A pointer that may be sent to the rayon tasks, each writing a disjoint set of elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks write disjoint elements (one head's columns of one sample each).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
#[derive(Clone, Copy)]
struct In(*const f32);
// SAFETY: read-only while the tasks run.
unsafe impl Send for In {}
unsafe impl Sync for In {}

fn dims3(t: &FlexTensor) -> [usize; 3] {
    burn::backend::TensorMetadata::shape(t).dims::<3>()
}

thread_local! {
    /// Each rayon thread's scores and probabilities of one (sample, head): reused, so they stay
    /// in its cache from one head to the next.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `(ctx, probs)`: ctx [batch, queries, hidden] for q [batch, queries, hidden] and k, v [batch,
/// seq, hidden] (fewer queries than keys: a last layer that only the CLS token leaves), and with
/// `keep_probs` the probabilities [batch, heads, queries, seq] the backward needs. Without them
/// (inference) each head's probabilities live only in the thread's scratch: no [batch, heads,
/// queries, seq] tensor is written (15 MB per layer for `full` image embedding at batch 8).
pub(super) fn forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    heads: usize,
    scale: f64,
    mask: &[bool],
    keep_probs: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let [b, sq, d] = dims3(&q);
    let s = dims3(&k)[1];
    assert!(
        heads > 0 && d % heads == 0,
        "hidden size {d} is not a multiple of {heads} heads"
    );
    assert!(
        dims3(&k) == [b, s, d] && dims3(&v) == [b, s, d],
        "k and v of one shape, q of their batch and width"
    );
    assert!(
        mask.is_empty() || mask.len() == b * s,
        "one mask entry per sample and key"
    );
    let dh = d / heads;
    let zeros = |shape: Vec<usize>| FlexTensor::from_data(TensorData::new(vec![0f32; shape.iter().product()], shape));
    if sq == 0 || s == 0 || dh == 0 {
        // Nothing to attend to or from: the context is empty or zero (no product with k = 0).
        return (zeros(vec![b, sq, d]), keep_probs.then(|| zeros(vec![b, heads, sq, s])));
    }
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let slice = |t: &FlexTensor| In(t.as_slice::<f32>().expect("contiguous f32 tensor").as_ptr());
    let (qp, kp, vp) = (slice(&q), slice(&k), slice(&v));
    // Written only through `out` below, every element once (each head's p·v covers its columns
    // of every row), so it is never read before it is written.
    let mut ctx: Vec<f32> = Vec::with_capacity(b * sq * d);
    // Likewise: each task's softmax rows write every value of its block before reading it.
    let mut probs: Vec<f32> = Vec::with_capacity(if keep_probs { b * heads * sq * s } else { 0 });
    let out = Out(ctx.as_mut_ptr());
    let kept = Out(probs.as_mut_ptr());
    let (di, si) = (d as isize, s as isize);
    (0..b * heads).into_par_iter().for_each(|bh| {
        let (bi, hi) = (bh / heads, bh % heads);
        // This head's columns of this sample: in q and ctx (sq rows), in k and v (s rows).
        let (base_q, base_k) = (bi * sq * d + hi * dh, bi * s * d + hi * dh);
        let (qp, kp, vp, out, kept) = (qp, kp, vp, out, kept);
        SCRATCH.with_borrow_mut(|(scores, scratch_p)| {
            scores.resize(sq * s, 0.0);
            // SAFETY: q holds b·sq·d values, k b·s·d; rows of this sample (of stride d) and this
            // head's dh columns from the bases stay inside; `scores` holds sq·s.
            unsafe {
                let q_bh = View::rows(qp.0.add(base_q), di);
                let kt_bh = View::columns(kp.0.add(base_k), di);
                matmul(sq, s, dh, scores.as_mut_ptr(), si, q_bh, kt_bh);
            }
            let p: &mut [f32] = if keep_probs {
                // SAFETY: `probs` holds b·heads·sq·s values and this task alone touches block bh.
                unsafe { std::slice::from_raw_parts_mut(kept.0.add(bh * sq * s), sq * s) }
            } else {
                scratch_p.resize(sq * s, 0.0);
                scratch_p
            };
            let m = (!mask.is_empty()).then(|| &mask[bi * s..(bi + 1) * s]);
            for (row, o) in scores.chunks_exact(s).zip(p.chunks_exact_mut(s)) {
                forward_row(row, m, scale as f32, o);
            }
            // SAFETY: v holds b·s·d values and ctx b·sq·d, the views stay inside as above, `p`
            // holds sq·s; this task alone writes this head's columns of this sample in ctx.
            unsafe {
                let p_bh = View::rows(p.as_ptr(), si);
                let v_bh = View::rows(vp.0.add(base_k), di);
                matmul(sq, dh, s, out.0.add(base_q), di, p_bh, v_bh);
            }
        });
    });
    // SAFETY: the tasks above wrote every row of every block (b·heads of sq·s values) and all
    // b·sq·d context values (every head's columns of every row); sq, s and dh are non-zero.
    unsafe {
        probs.set_len(if keep_probs { b * heads * sq * s } else { 0 });
        ctx.set_len(b * sq * d);
    }
    (
        FlexTensor::from_data(TensorData::new(ctx, [b, sq, d])),
        keep_probs.then(|| FlexTensor::from_data(TensorData::new(probs, [b, heads, sq, s]))),
    )
}

/// `(dq, dk, dv)` of [`forward`] for the context gradient `grad` [batch, queries, hidden]:
/// dq [batch, queries, hidden], dk and dv [batch, seq, hidden].
pub(super) fn backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: FlexTensor,
    scale: f64,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [b, sq, d] = dims3(&q);
    let s = dims3(&k)[1];
    let heads = burn::backend::TensorMetadata::shape(&probs).dims::<4>()[1];
    let dh = d / heads;
    let zeros = |rows: usize| FlexTensor::from_data(TensorData::new(vec![0f32; b * rows * d], [b, rows, d]));
    if sq == 0 || s == 0 || dh == 0 {
        // The forward wrote zeros: no product reached q, k or v.
        return (zeros(sq), zeros(s), zeros(s));
    }
    let (q, k, v, probs, grad) = (
        contiguous(q),
        contiguous(k),
        contiguous(v),
        contiguous(probs),
        contiguous(grad),
    );
    let slice = |t: &FlexTensor| In(t.as_slice::<f32>().expect("contiguous f32 tensor").as_ptr());
    let (qp, kp, vp, gp) = (slice(&q), slice(&k), slice(&v), slice(&grad));
    let p_all = probs.as_slice::<f32>().expect("contiguous f32 tensor");
    // Written only through the raw pointers below, every element once (each head's gemms
    // cover its columns of every row), so never read before written.
    let mut dq: Vec<f32> = Vec::with_capacity(b * sq * d);
    let mut dk: Vec<f32> = Vec::with_capacity(b * s * d);
    let mut dv: Vec<f32> = Vec::with_capacity(b * s * d);
    let (dqp, dkp, dvp) = (Out(dq.as_mut_ptr()), Out(dk.as_mut_ptr()), Out(dv.as_mut_ptr()));
    let (di, si) = (d as isize, s as isize);
    p_all.par_chunks(sq * s).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = (bh / heads, bh % heads);
        let (base_q, base_k) = (bi * sq * d + hi * dh, bi * s * d + hi * dh);
        let (qp, kp, vp, gp, dqp, dkp, dvp) = (qp, kp, vp, gp, dqp, dkp, dvp);
        SCRATCH.with_borrow_mut(|(dp, ds)| {
            dp.resize(sq * s, 0.0);
            ds.resize(sq * s, 0.0);
            // SAFETY: as in `forward`: every view stays inside its b·sq·d, b·s·d (or sq·s)
            // buffer, and this task alone writes this head's columns of this sample in dq, dk
            // and dv.
            unsafe {
                let g_bh = View::rows(gp.0.add(base_q), di);
                let vt_bh = View::columns(vp.0.add(base_k), di);
                matmul(sq, s, dh, dp.as_mut_ptr(), si, g_bh, vt_bh);
                let pt = View::columns(p.as_ptr(), si);
                matmul(s, dh, sq, dvp.0.add(base_k), di, pt, g_bh);
            }
            for ((y, dy), o) in p.chunks_exact(s).zip(dp.chunks_exact(s)).zip(ds.chunks_exact_mut(s)) {
                backward_row(y, dy, scale as f32, o);
            }
            // SAFETY: as above.
            unsafe {
                let ds_v = View::rows(ds.as_ptr(), si);
                let dst_v = View::columns(ds.as_ptr(), si);
                let k_bh = View::rows(kp.0.add(base_k), di);
                let q_bh = View::rows(qp.0.add(base_q), di);
                matmul(sq, dh, s, dqp.0.add(base_q), di, ds_v, k_bh);
                matmul(s, dh, sq, dkp.0.add(base_k), di, dst_v, q_bh);
            }
        });
    });
    let t = |mut x: Vec<f32>, rows: usize| {
        // SAFETY: the tasks above wrote all b·rows·d values (every head's columns of every row);
        // sq, s and dh are non-zero.
        unsafe { x.set_len(b * rows * d) };
        FlexTensor::from_data(TensorData::new(x, [b, rows, d]))
    };
    (t(dq, sq), t(dk, s), t(dv, s))
}
