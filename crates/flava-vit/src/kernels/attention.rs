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

/// `(ctx, probs)`: ctx [batch, seq, hidden], probs [batch, heads, seq, seq].
pub(super) fn forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    heads: usize,
    scale: f64,
    mask: &[bool],
) -> (FlexTensor, FlexTensor) {
    let [b, s, d] = dims3(&q);
    assert!(
        heads > 0 && d % heads == 0,
        "hidden size {d} is not a multiple of {heads} heads"
    );
    assert!(
        dims3(&k) == [b, s, d] && dims3(&v) == [b, s, d],
        "q, k and v of one shape"
    );
    assert!(
        mask.is_empty() || mask.len() == b * s,
        "one mask entry per sample and key"
    );
    let dh = d / heads;
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let slice = |t: &FlexTensor| In(t.as_slice::<f32>().expect("contiguous f32 tensor").as_ptr());
    let (qp, kp, vp) = (slice(&q), slice(&k), slice(&v));
    let mut ctx = vec![0f32; b * s * d];
    let mut probs = vec![0f32; b * heads * s * s];
    let out = Out(ctx.as_mut_ptr());
    let (di, si) = (d as isize, s as isize);
    probs.par_chunks_mut((s * s).max(1)).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = (bh / heads, bh % heads);
        let base = bi * s * d + hi * dh;
        let mut scores = vec![0f32; s * s];
        let (qp, kp, vp, out) = (qp, kp, vp, out);
        // SAFETY: q, k, v and ctx hold b·s·d values; rows of this sample (s of stride d) and this
        // head's dh columns from `base` stay inside; `scores` and `p` hold s·s; this task alone
        // writes this head's columns of this sample in ctx.
        unsafe {
            let q_bh = View {
                ptr: qp.0.add(base),
                rs: di,
                cs: 1,
            };
            let kt_bh = View {
                ptr: kp.0.add(base),
                rs: 1,
                cs: di,
            };
            matmul(s, s, dh, scores.as_mut_ptr(), si, q_bh, kt_bh);
        }
        let m = (!mask.is_empty()).then(|| &mask[bi * s..(bi + 1) * s]);
        for (row, o) in scores.chunks_exact(s).zip(p.chunks_exact_mut(s)) {
            forward_row(row, m, scale as f32, o);
        }
        // SAFETY: as above.
        unsafe {
            let p_bh = View {
                ptr: p.as_ptr(),
                rs: si,
                cs: 1,
            };
            let v_bh = View {
                ptr: vp.0.add(base),
                rs: di,
                cs: 1,
            };
            matmul(s, dh, s, out.0.add(base), di, p_bh, v_bh);
        }
    });
    (
        FlexTensor::from_data(TensorData::new(ctx, [b, s, d])),
        FlexTensor::from_data(TensorData::new(probs, [b, heads, s, s])),
    )
}

/// `(dq, dk, dv)` of [`forward`] for the context gradient `grad` [batch, seq, hidden].
pub(super) fn backward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: FlexTensor,
    scale: f64,
    grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [b, s, d] = dims3(&q);
    let heads = burn::backend::TensorMetadata::shape(&probs).dims::<4>()[1];
    let dh = d / heads;
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
    let mut dq = vec![0f32; b * s * d];
    let mut dk = vec![0f32; b * s * d];
    let mut dv = vec![0f32; b * s * d];
    let (dqp, dkp, dvp) = (Out(dq.as_mut_ptr()), Out(dk.as_mut_ptr()), Out(dv.as_mut_ptr()));
    let (di, si) = (d as isize, s as isize);
    p_all.par_chunks((s * s).max(1)).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = (bh / heads, bh % heads);
        let base = bi * s * d + hi * dh;
        let (qp, kp, vp, gp, dqp, dkp, dvp) = (qp, kp, vp, gp, dqp, dkp, dvp);
        let mut dp = vec![0f32; s * s];
        let mut ds = vec![0f32; s * s];
        // SAFETY: as in `forward`: every view stays inside its b·s·d (or s·s) buffer, and this
        // task alone writes this head's columns of this sample in dq, dk and dv.
        unsafe {
            let g_bh = View {
                ptr: gp.0.add(base),
                rs: di,
                cs: 1,
            };
            let vt_bh = View {
                ptr: vp.0.add(base),
                rs: 1,
                cs: di,
            };
            matmul(s, s, dh, dp.as_mut_ptr(), si, g_bh, vt_bh);
            let pt = View {
                ptr: p.as_ptr(),
                rs: 1,
                cs: si,
            };
            matmul(s, dh, s, dvp.0.add(base), di, pt, g_bh);
        }
        for ((y, dy), o) in p.chunks_exact(s).zip(dp.chunks_exact(s)).zip(ds.chunks_exact_mut(s)) {
            backward_row(y, dy, scale as f32, o);
        }
        // SAFETY: as above.
        unsafe {
            let ds_v = View {
                ptr: ds.as_ptr(),
                rs: si,
                cs: 1,
            };
            let dst_v = View {
                ptr: ds.as_ptr(),
                rs: 1,
                cs: si,
            };
            let k_bh = View {
                ptr: kp.0.add(base),
                rs: di,
                cs: 1,
            };
            let q_bh = View {
                ptr: qp.0.add(base),
                rs: di,
                cs: 1,
            };
            matmul(s, dh, s, dqp.0.add(base), di, ds_v, k_bh);
            matmul(s, dh, s, dkp.0.add(base), di, dst_v, q_bh);
        }
    });
    let t = |x: Vec<f32>| FlexTensor::from_data(TensorData::new(x, [b, s, d]));
    (t(dq), t(dk), t(dv))
}
