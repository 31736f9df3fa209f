//! `y = x·W + b` over rows, and its three gradients, each as one `gemm` call on the operands'
//! own layouts (W is [in, out], Burn's layout; the transposes are strides, not copies).
//!
//! Burn's flex matmul allocates each output by zero-filling a byte vector and copying it into an
//! aligned buffer (two passes before the gemm writes it), the bias is a second tensor operation,
//! and the backward allocates the same way: measured, a `memset` and a `memmove` took 14% of a
//! `tiny` pretraining step. Here the output starts as the bias rows (or is written by the gemm
//! alone) and the gradients are written once.

use burn::prelude::*;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::blas::{sgemm, Threads, View};
use super::contiguous;

pub(super) fn dims2(t: &FlexTensor) -> [usize; 2] {
    burn::backend::TensorMetadata::shape(t).dims::<2>()
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

/// `dst[m×n] (+)= a[m×k]·b[k×n]` with `a`, `b` given as (pointer, row stride, column stride);
/// `accumulate` adds to what `dst` holds. On the process's sgemm backend ([`super::blas`]).
///
/// # Safety
/// Every element the shapes and strides reach must be inside its buffer; `dst` (row-major, n
/// columns) holds m·n values and overlaps neither input; with `accumulate` false every element
/// of `dst` is written (k > 0).
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    accumulate: bool,
) {
    let view = |(ptr, rs, cs): (*const f32, isize, isize)| View { ptr, rs, cs };
    // SAFETY: the caller's contract.
    unsafe { sgemm(m, n, k, dst, n as isize, view(a), view(b), accumulate, Threads::All) }
}

/// A pointer that rayon's tasks may share (each writes its own rows).
#[derive(Clone, Copy)]
struct Rows(*mut f32);
// SAFETY: the tasks write disjoint rows.
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    /// The element at `offset` (a method, so that closures capture the whole `Rows`).
    ///
    /// # Safety
    /// `offset` is inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// `x` [n, in] · `w` [in, out] + `b` [out] (+ `residual` [n, out]) → [n, out].
///
/// The output starts as the bias rows (plus the residual's), written over rayon's threads, and
/// the product is added to them: one write pass before the gemm's, where the residual connection
/// of a pre-LN layer otherwise costs a second full pass and a second tensor.
pub(super) fn forward(x: FlexTensor, w: FlexTensor, b: FlexTensor, residual: Option<FlexTensor>) -> FlexTensor {
    let [n, d_in] = dims2(&x);
    let [w_in, d_out] = dims2(&w);
    assert_eq!(d_in, w_in, "x has {d_in} columns, the weight {w_in} rows");
    let (x, w, b) = (contiguous(x), contiguous(w), contiguous(b));
    let bias = f32s(&b);
    assert_eq!(bias.len(), d_out, "one bias per output");
    let residual = residual.map(contiguous);
    let res = residual.as_ref().map(f32s);
    if let Some(r) = res {
        assert_eq!(r.len(), n * d_out, "the residual has the output's shape [{n}, {d_out}]");
    }
    let mut y: Vec<f32> = Vec::with_capacity(n * d_out);
    let dst = Rows(y.as_mut_ptr());
    const ROWS: usize = 64;
    (0..n.div_ceil(ROWS)).into_par_iter().for_each(|block| {
        for row in block * ROWS..((block + 1) * ROWS).min(n) {
            // SAFETY: y has capacity n·out; this task alone writes rows of this block.
            let out = unsafe { dst.at(row * d_out) };
            match res {
                Some(r) => {
                    let r = &r[row * d_out..(row + 1) * d_out];
                    for (j, (&rv, &bv)) in r.iter().zip(bias).enumerate() {
                        // SAFETY: j < out, inside this row.
                        unsafe { out.add(j).write(rv + bv) };
                    }
                }
                // SAFETY: bias holds out values; the row holds out values; distinct buffers.
                None => unsafe { std::ptr::copy_nonoverlapping(bias.as_ptr(), out, d_out) },
            }
        }
    });
    // SAFETY: every row was written above (f32 has no invalid bit patterns).
    unsafe { y.set_len(n * d_out) };
    if d_in > 0 && n > 0 && d_out > 0 {
        // SAFETY: x is n·in, w is in·out (row-major), y holds n·out; distinct buffers.
        unsafe {
            gemm_into(
                n,
                d_out,
                d_in,
                y.as_mut_ptr(),
                (f32s(&x).as_ptr(), d_in as isize, 1),
                (f32s(&w).as_ptr(), d_out as isize, 1),
                true,
            );
        }
    }
    FlexTensor::from_data(TensorData::new(y, [n, d_out]))
}

/// A fresh n·m buffer written entirely by `write` (a gemm that does not read its destination).
fn written_by(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(len);
    write(out.as_mut_ptr());
    // SAFETY: `write` wrote all `len` values (the callers' gemms cover every element), and f32
    // has no invalid bit patterns.
    unsafe { out.set_len(len) };
    out
}

/// `dx = dy · wᵀ`: dy [n, out], w [in, out] → [n, in].
pub(super) fn backward_input(w: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let [n, d_out] = dims2(&grad);
    let [d_in, _] = dims2(&w);
    let (w, grad) = (contiguous(w), contiguous(grad));
    if d_out == 0 || n == 0 || d_in == 0 {
        return FlexTensor::from_data(TensorData::new(vec![0f32; n * d_in], [n, d_in]));
    }
    let dx = written_by(n * d_in, |dst| {
        // SAFETY: dy is n·out; wᵀ(o, i) = w[i·out + o]; dst holds n·in; k = out > 0.
        unsafe {
            gemm_into(
                n,
                d_in,
                d_out,
                dst,
                (f32s(&grad).as_ptr(), d_out as isize, 1),
                (f32s(&w).as_ptr(), 1, d_out as isize),
                false,
            )
        }
    });
    FlexTensor::from_data(TensorData::new(dx, [n, d_in]))
}

/// `dW = xᵀ · dy`: x [n, in], dy [n, out] → [in, out].
pub(super) fn backward_weight(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let [n, d_in] = dims2(&x);
    let [_, d_out] = dims2(&grad);
    let (x, grad) = (contiguous(x), contiguous(grad));
    if n == 0 || d_in == 0 || d_out == 0 {
        return FlexTensor::from_data(TensorData::new(vec![0f32; d_in * d_out], [d_in, d_out]));
    }
    let dw = written_by(d_in * d_out, |dst| {
        // SAFETY: xᵀ(i, r) = x[r·in + i]; dy is n·out; dst holds in·out; k = n > 0.
        unsafe {
            gemm_into(
                d_in,
                d_out,
                n,
                dst,
                (f32s(&x).as_ptr(), 1, d_in as isize),
                (f32s(&grad).as_ptr(), d_out as isize, 1),
                false,
            )
        }
    });
    FlexTensor::from_data(TensorData::new(dw, [d_in, d_out]))
}

/// `db = Σ_rows dy`: dy [n, out] → [out] (partial sums over blocks of rows, in parallel).
pub(super) fn backward_bias(grad: FlexTensor) -> FlexTensor {
    let [_, d_out] = dims2(&grad);
    let grad = contiguous(grad);
    let dy = f32s(&grad);
    const ROWS: usize = 256;
    // Partial sums per block, then added in block order: the same bits on every run (a rayon
    // reduce combines in an order that depends on work stealing).
    let partials: Vec<Vec<f32>> = dy
        .par_chunks((ROWS * d_out).max(1))
        .map(|block| {
            let mut acc = vec![0f32; d_out];
            for row in block.chunks_exact(d_out.max(1)) {
                acc.iter_mut().zip(row).for_each(|(a, &g)| *a += g);
            }
            acc
        })
        .collect();
    let mut db = vec![0f32; d_out];
    for p in &partials {
        db.iter_mut().zip(p).for_each(|(a, &b)| *a += b);
    }
    FlexTensor::from_data(TensorData::new(db, [d_out]))
}
