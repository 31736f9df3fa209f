//! Kernels for the flex backend that Burn composes from many passes, as a Burn backend extension:
//! exact (erf) GELU (`gelu.rs`) and row-wise softmax cross-entropy (`cross_entropy.rs`), each with
//! its own backward pass; `math.rs` holds the vectorisable erf and exp they share.
//!
//! ## GELU
//!
//! Burn's flex backend evaluates erf with scalar `libm::erff`, one element at a time, in both the
//! GELU and its gradient: measured, that was a fifth of a `small` pretraining step. Here the same
//! function is computed with a rational approximation of erf and a polynomial exp that the
//! compiler vectorises (AVX-512 or AVX2 where the CPU has them, chosen at run time), over both
//! cores. erf is within 5e-7 of the true value (tested), GELU and its gradient within 1e-6 of
//! Burn's: the level of PyTorch's own vectorised CPU GELU, which also approximates erf.
//!
//! ## Cross-entropy
//! Burn's `log_softmax(..).gather(..)` makes about ten passes over the logits forward and as many
//! backward, with a zero-filled scatter for the gather's gradient: 56 ms against PyTorch's 4 ms for
//! the 147 × 30522 logits of the MLM head. [`cross_entropy_rows`] makes one pass forward (max,
//! then sum of exp) and one backward (`softmax − one-hot`, recomputed from the saved logits).
//!
//! [`gelu`] and [`cross_entropy_rows`] are the entry points: on flex devices (with or without
//! autodiff) they run these kernels; on every other device, Burn's own ops.

/// Compiles the body three times (AVX-512, AVX2+FMA, baseline) and runs the best the CPU has.
macro_rules! multiversion {
    ($vis:vis $name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {
        multiversion!($vis $name ( $($arg : $ty),* ) -> () $body);
    };
    ($vis:vis $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty $body:block) => {
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `v3` is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body
        }
    };
}

mod attention;
pub mod blas;
mod cross_entropy;
mod embedding;
mod gelu;
mod layer_norm;
mod linear;
mod math;
mod softmax;

use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, DispatchDevice, Flex};
use burn::prelude::*;
use burn::tensor::DType;
use burn_autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn_autodiff::{Autodiff, NodeId};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Operations of this crate that a backend implements natively.
#[backend_extension(Flex, Autodiff)]
pub trait FlavaKernels: Backend {
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))`, element-wise.
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `grad · GELU'(x)`, element-wise, for the backward pass.
    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Per-row `logsumexp(logits_i) − logits_i[target_i]`: logits [n, classes] → `[n]`.
    fn softmax_cross_entropy(logits: FloatTensor<Self>, targets: Vec<usize>) -> FloatTensor<Self>;
    /// `grad_i · (softmax(logits_i) − onehot(target_i))`: the gradient of the above, [n, classes].
    fn softmax_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: Vec<usize>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// LayerNorm over the last dimension of `x` with `gamma`, `beta` `[d]` and `eps`.
    fn layer_norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// [`FlavaKernels::layer_norm_rows`] and each row's statistics [rows, 3] (the mean as two
    /// f32, hi + lo, and `1/√(var + eps)`) for the backward.
    fn layer_norm_rows_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dx, dgamma, dbeta)` of [`FlavaKernels::layer_norm_rows`] for the upstream `grad`, from
    /// the statistics of [`FlavaKernels::layer_norm_rows_with_stats`].
    fn layer_norm_rows_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// `softmax(scores·scale + pad·f32::MIN)` over the last dimension of scores
    /// [batch, heads, queries, keys]; `key_padding` is empty or [batch·keys] (true = padded).
    fn attention_softmax(scores: FloatTensor<Self>, scale: f64, key_padding: Vec<bool>) -> FloatTensor<Self>;
    /// The scores' gradient of [`FlavaKernels::attention_softmax`] from its output `probs`.
    fn attention_softmax_backward(probs: FloatTensor<Self>, scale: f64, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x·w + b` for x [n, in], w [in, out] (Burn's Linear layout), b `[out]` → [n, out].
    fn linear_rows_forward(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x·w + b + r`: [`FlavaKernels::linear_rows_forward`] with the residual `r` [n, out] added
    /// in the same pass (a pre-LN layer's `x + f(x)`).
    fn linear_rows_residual_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        r: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `grad·wᵀ`: the input gradient of [`FlavaKernels::linear_rows_forward`], [n, in].
    fn linear_rows_backward_input(w: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `xᵀ·grad`: the weight gradient, [in, out].
    fn linear_rows_backward_weight(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `Σ_rows grad`: the bias gradient, `[out]`.
    fn linear_rows_backward_bias(grad: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Rows `ids` of `table` [vocab, d] → [ids.len(), d] (every id below vocab).
    fn embedding_rows(table: FloatTensor<Self>, ids: Vec<usize>) -> FloatTensor<Self>;
    /// The table gradient [vocab, d] of [`FlavaKernels::embedding_rows`] for `grad` [ids.len(), d].
    fn embedding_rows_backward(grad: FloatTensor<Self>, ids: Vec<usize>, vocab: usize) -> FloatTensor<Self>;
    /// `Σ x²` over all elements, accumulated in f64, as two f32 `[hi, lo]` (hi + lo in f64 is the
    /// sum): not differentiable (for gradient norms).
    fn sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Multi-head attention `softmax(q·kᵀ·scale + pad·f32::MIN)·v` per head on q [batch,
    /// queries, hidden] and k, v [batch, seq, hidden] (head h in columns h·dh..(h+1)·dh) → the
    /// context [batch, queries, hidden]; `key_padding` is empty or [batch·seq] (true = padded key).
    fn multi_head_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
        scale: f64,
        key_padding: Vec<bool>,
    ) -> FloatTensor<Self>;
    /// [`FlavaKernels::multi_head_attention`] with its probabilities [batch, heads, queries, seq].
    fn multi_head_attention_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
        scale: f64,
        key_padding: Vec<bool>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// `(dq, dk, dv)` of [`FlavaKernels::multi_head_attention`] from its inputs, its
    /// probabilities and the context gradient `grad`.
    fn multi_head_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        scale: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether `x` lives on a flex device (plain or autodiff) and is f32: where the kernels of this
/// module (and the CPU paths of the other crates) run.
pub fn on_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().without_autodiff().as_dispatch(), DispatchDevice::Flex(_)) && x.dtype() == DType::F32
}

/// Exact GELU of any tensor: the vectorised kernels on flex devices, Burn's `gelu` elsewhere.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let on_flex = matches!(x.device().without_autodiff().as_dispatch(), DispatchDevice::Flex(_));
    if on_flex && x.dtype() == DType::F32 {
        Tensor::from_dispatch(burn::backend::Dispatch::exact_gelu(x.into_dispatch()))
    } else {
        burn::tensor::activation::gelu(x)
    }
}

/// Per-row cross-entropy `−log softmax(logits_i)[target_i]`: logits [n, classes], `targets` n
/// class indices (each < classes) → `[n]`.
///
/// # Panics
/// If `targets.len()` is not `n` or a target is out of range.
pub fn cross_entropy_rows(logits: Tensor<2>, targets: &[usize]) -> Tensor<1> {
    let [n, classes] = logits.dims();
    assert_eq!(targets.len(), n, "one target per row");
    assert!(
        targets.iter().all(|&t| t < classes),
        "a target is not below the number of classes ({classes})"
    );
    if on_flex_f32(&logits) {
        let out = burn::backend::Dispatch::softmax_cross_entropy(logits.into_dispatch(), targets.to_vec());
        return Tensor::from_dispatch(out);
    }
    cross_entropy_rows_composed(logits, targets)
}

/// LayerNorm over the last dimension of `x` [.., d] with `gamma`, `beta` `[d]` and `eps`: the
/// one-pass kernels on flex devices, Burn's `layer_norm` elsewhere.
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<D> {
    if on_flex_f32(&x) && gamma.dtype() == DType::F32 && beta.dtype() == DType::F32 {
        let out = burn::backend::Dispatch::layer_norm_rows(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            eps,
        );
        return Tensor::from_dispatch(out);
    }
    burn::tensor::module::layer_norm(x, gamma, Some(beta), eps)
}

/// Attention probabilities `softmax(scores·scale + pad·f32::MIN)` over the keys: `scores`
/// [batch, heads, queries, keys], `key_padding` [batch, keys] (true = padded key). HF's arithmetic;
/// one pass forward and one backward on flex devices, Burn's ops elsewhere.
pub fn attention_softmax(scores: Tensor<4>, scale: f64, key_padding: Option<&Tensor<2, Bool>>) -> Tensor<4> {
    let [b, _, _, s] = scores.dims();
    if on_flex_f32(&scores) {
        let mask = match key_padding {
            Some(m) => m.clone().into_data().try_into_vec::<bool>().expect("bool mask data"),
            None => Vec::new(),
        };
        let out = burn::backend::Dispatch::attention_softmax(scores.into_dispatch(), scale, mask);
        return Tensor::from_dispatch(out);
    }
    attention_softmax_composed(scores, scale, key_padding.map(|m| (m, b, s)))
}

/// `x·w + b` over the rows of `x` [n, in] with `w` [in, out] (Burn's `Linear` layout) and `b`
/// `[out]` → [n, out]: one gemm forward and one per gradient on flex, without the zero-filled
/// copies Burn's matmul allocates its outputs with; Burn's `linear` elsewhere.
///
/// # Panics
/// If the shapes do not fit.
pub fn linear(x: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<2> {
    let on_flex = on_flex_f32(&x) && on_flex_f32(&w) && b.as_ref().is_none_or(on_flex_f32);
    if !on_flex {
        return burn::tensor::module::linear(x, w, b);
    }
    let b = b.unwrap_or_else(|| Tensor::zeros([w.dims()[1]], &w.device()));
    let out = burn::backend::Dispatch::linear_rows_forward(x.into_dispatch(), w.into_dispatch(), b.into_dispatch());
    Tensor::from_dispatch(out)
}

/// `x·w + b + residual` over the rows of `x` [n, in] with `w` [in, out], `b` `[out]` and
/// `residual` [n, out] → [n, out]: [`linear`] with a pre-LN layer's residual connection added in
/// the pass that writes the bias (one tensor and one pass fewer than `linear(..) + residual`); the
/// residual's gradient is the output's. Burn's ops elsewhere.
///
/// # Panics
/// If the shapes do not fit.
pub fn linear_residual(x: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>, residual: Tensor<2>) -> Tensor<2> {
    let on_flex = on_flex_f32(&x) && on_flex_f32(&w) && on_flex_f32(&residual) && b.as_ref().is_none_or(on_flex_f32);
    if !on_flex {
        return burn::tensor::module::linear(x, w, b) + residual;
    }
    let [n, _] = x.dims();
    let d_out = w.dims()[1];
    assert_eq!(residual.dims(), [n, d_out], "the residual has the output's shape");
    let b = b.unwrap_or_else(|| Tensor::zeros([d_out], &w.device()));
    let out = burn::backend::Dispatch::linear_rows_residual_forward(
        x.into_dispatch(),
        w.into_dispatch(),
        b.into_dispatch(),
        residual.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// Rows of the embedding table `table` [vocab, d] for `ids` [batch, seq] → [batch, seq, d]: on
/// flex one gather forward and, backward, the table gradient written once over the threads
/// (Burn's zero-fills it on one thread and copies it again); Burn's `embedding` elsewhere.
///
/// # Panics
/// If an id is not below vocab (as Burn's lookup).
pub fn embedding(table: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    if !on_flex_f32(&table) {
        return burn::tensor::module::embedding(table, ids);
    }
    let [b, s] = ids.dims();
    let [vocab, d] = table.dims();
    let ids: Vec<usize> = ids
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("integer ids")
        .into_iter()
        .map(|i| {
            assert!(
                (0..vocab as i64).contains(&i),
                "embedding id {i} is outside the table ({vocab} rows)"
            );
            i as usize
        })
        .collect();
    let out = burn::backend::Dispatch::embedding_rows(table.into_dispatch(), ids);
    Tensor::<2>::from_dispatch(out).reshape([b, s, d])
}

/// `Σ x²` over every element of `x` as f64, without autodiff (a gradient norm's term): on flex
/// one read pass accumulated in f64; elsewhere Burn's `square().sum()` (f32).
pub fn sum_of_squares<const D: usize>(x: &Tensor<D>) -> f64 {
    let x = x.clone().without_autodiff();
    if on_flex_f32(&x) {
        let out = Tensor::<1>::from_dispatch(burn::backend::Dispatch::sum_of_squares(x.into_dispatch()));
        let v = out.into_data().try_into_vec::<f32>().expect("f32 data");
        return v[0] as f64 + v[1] as f64;
    }
    x.square().sum().into_scalar::<f64>()
}

multiversion!(sum_of_squares_slice(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            let v = c[k] as f64;
            lanes[k] += v * v;
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
    lanes.iter().sum::<f64>() + rest
});

/// Multi-head attention on the projections' layout: `q` [batch, queries, hidden], `k`, `v`
/// [batch, seq, hidden] with `heads` heads side by side in the hidden dimension, `key_padding`
/// [batch, seq] (true = padded key) → the context [batch, queries, hidden], ready for the output
/// projection. Usually queries = seq; fewer queries attend over all keys (the CLS row alone in a
/// last layer, see `Encoder::forward_at`). HF's arithmetic
/// (scale `1/√dh`, the most negative f32 on padded keys); on flex one kernel forward and one
/// backward (see `attention.rs`), Burn's ops elsewhere. A NaN or infinity in a query, key or
/// score makes its row NaN, as in PyTorch, so the training loop's non-finite guard sees it
/// (Burn's own fused attention takes its row maximum with comparisons that pass over NaN).
///
/// # Panics
/// If the shapes differ or `hidden` is not a multiple of `heads`.
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    key_padding: Option<&Tensor<2, Bool>>,
) -> Tensor<3> {
    let [b, _, d] = q.dims();
    let s = k.dims()[1];
    assert!(
        heads > 0 && d % heads == 0,
        "hidden size {d} is not a multiple of {heads} heads"
    );
    assert!(
        k.dims() == [b, s, d] && v.dims() == [b, s, d],
        "k and v of one shape, q of their batch and width"
    );
    let scale = 1.0 / ((d / heads) as f64).sqrt();
    if on_flex_f32(&q) && on_flex_f32(&k) && on_flex_f32(&v) {
        let mask = match key_padding {
            Some(m) => m.clone().into_data().try_into_vec::<bool>().expect("bool mask data"),
            None => Vec::new(),
        };
        let out = burn::backend::Dispatch::multi_head_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            heads,
            scale,
            mask,
        );
        return Tensor::from_dispatch(out);
    }
    multi_head_attention_composed(q, k, v, heads, key_padding)
}

/// [`multi_head_attention`] from Burn's ops (head split, batched matmuls, [`attention_softmax`]):
/// the path on devices other than flex, and the reference the kernel is tested against.
pub fn multi_head_attention_composed(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    key_padding: Option<&Tensor<2, Bool>>,
) -> Tensor<3> {
    let [b, sq, d] = q.dims();
    let dh = d / heads;
    let split = |t: Tensor<3>| {
        let rows = t.dims()[1];
        t.reshape([b, rows, heads, dh]).swap_dims(1, 2)
    };
    let scores = split(q).matmul(split(k).swap_dims(2, 3));
    let probs = attention_softmax(scores, 1.0 / (dh as f64).sqrt(), key_padding);
    probs.matmul(split(v)).swap_dims(1, 2).reshape([b, sq, d])
}

/// [`attention_softmax`] from Burn's own ops: the path on devices other than flex, and the
/// reference the kernel is tested against.
fn attention_softmax_composed(
    scores: Tensor<4>,
    scale: f64,
    key_padding: Option<(&Tensor<2, Bool>, usize, usize)>,
) -> Tensor<4> {
    let scores = scores * scale;
    let scores = match key_padding {
        Some((m, b, s)) => scores + m.clone().float().reshape([b, 1, 1, s]) * f32::MIN as f64,
        None => scores,
    };
    burn::tensor::activation::softmax(scores, 3)
}

/// [`cross_entropy_rows`] from Burn's own ops (`log_softmax`, `gather`): the path on devices other
/// than flex, and the reference the kernel is tested against.
fn cross_entropy_rows_composed(logits: Tensor<2>, targets: &[usize]) -> Tensor<1> {
    let [n, _] = logits.dims();
    let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &logits.device());
    -burn::tensor::activation::log_softmax(logits, 1)
        .gather(1, idx)
        .reshape([n])
}

impl FlavaKernels for Flex {
    fn exact_gelu(mut x: FlexTensor) -> FlexTensor {
        // Without autodiff nothing else holds the pre-activation (the FFN's [n, 4·d], the largest
        // tensor of a layer): overwrite it rather than allocate and fill a second one.
        let n = x.layout().num_elements();
        let whole = x.layout().contiguous_offsets() == Some((0, n));
        if whole && x.dtype() == burn::tensor::DType::F32 {
            if let Some(data) = x.try_storage_mut::<f32>() {
                const CHUNK: usize = 1 << 14;
                data[..n].par_chunks_mut(CHUNK).for_each(gelu::gelu_in_place);
                return x;
            }
        }
        map_f32([x], |[x], out| gelu::gelu_slice(x, out))
    }

    fn exact_gelu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        map_f32([x, grad], |[x, g], out| gelu::gelu_grad_slice(x, g, out))
    }

    fn softmax_cross_entropy(logits: FlexTensor, targets: Vec<usize>) -> FlexTensor {
        cross_entropy::forward(logits, &targets)
    }

    fn softmax_cross_entropy_backward(logits: FlexTensor, targets: Vec<usize>, grad: FlexTensor) -> FlexTensor {
        cross_entropy::backward(logits, &targets, grad)
    }

    fn layer_norm_rows(x: FlexTensor, gamma: FlexTensor, beta: FlexTensor, eps: f64) -> FlexTensor {
        layer_norm::forward(x, gamma, beta, eps, false).0
    }

    fn layer_norm_rows_with_stats(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> (FlexTensor, FlexTensor) {
        let (out, stats) = layer_norm::forward(x, gamma, beta, eps, true);
        (out, stats.expect("kept statistics"))
    }

    fn layer_norm_rows_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        stats: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        layer_norm::backward(x, gamma, stats, grad)
    }

    fn attention_softmax(scores: FlexTensor, scale: f64, key_padding: Vec<bool>) -> FlexTensor {
        softmax::forward(scores, scale, &key_padding)
    }

    fn attention_softmax_backward(probs: FlexTensor, scale: f64, grad: FlexTensor) -> FlexTensor {
        softmax::backward(probs, scale, grad)
    }

    fn linear_rows_forward(x: FlexTensor, w: FlexTensor, b: FlexTensor) -> FlexTensor {
        linear::forward(x, w, b, None)
    }

    fn linear_rows_residual_forward(x: FlexTensor, w: FlexTensor, b: FlexTensor, r: FlexTensor) -> FlexTensor {
        linear::forward(x, w, b, Some(r))
    }

    fn linear_rows_backward_input(w: FlexTensor, grad: FlexTensor) -> FlexTensor {
        linear::backward_input(w, grad)
    }

    fn linear_rows_backward_weight(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        linear::backward_weight(x, grad)
    }

    fn linear_rows_backward_bias(grad: FlexTensor) -> FlexTensor {
        linear::backward_bias(grad)
    }

    fn embedding_rows(table: FlexTensor, ids: Vec<usize>) -> FlexTensor {
        embedding::forward(table, &ids)
    }

    fn embedding_rows_backward(grad: FlexTensor, ids: Vec<usize>, vocab: usize) -> FlexTensor {
        embedding::backward(grad, &ids, vocab)
    }

    fn sum_of_squares(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let values = x.as_slice::<f32>().expect("contiguous f32 tensor");
        // Partial sums added in chunk order: the same bits on every run.
        let partials: Vec<f64> = values.par_chunks(1 << 16).map(sum_of_squares_slice).collect();
        let total: f64 = partials.iter().sum();
        let hi = total as f32;
        let lo = (total - hi as f64) as f32;
        FlexTensor::from_data(TensorData::new(vec![hi, lo], [2]))
    }

    fn multi_head_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        heads: usize,
        scale: f64,
        key_padding: Vec<bool>,
    ) -> FlexTensor {
        attention::forward(q, k, v, heads, scale, &key_padding, false).0
    }

    fn multi_head_attention_probs(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        heads: usize,
        scale: f64,
        key_padding: Vec<bool>,
    ) -> (FlexTensor, FlexTensor) {
        let (ctx, probs) = attention::forward(q, k, v, heads, scale, &key_padding, true);
        (ctx, probs.expect("kept probabilities"))
    }

    fn multi_head_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        probs: FlexTensor,
        scale: f64,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        attention::backward(q, k, v, probs, scale, grad)
    }
}

/// Registers the gradients of `x·w + b` (`x` [rows, in], `w` [in, out]) for the parents
/// `[x, w, b]` that need one: a frozen weight or an input without a graph gets none.
fn register_linear_grads<B: Backend + FlavaKernels>(
    grads: &mut Gradients,
    [x_id, w_id, b_id]: [Option<NodeId>; 3],
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    grad: FloatTensor<B>,
) {
    if let Some(id) = w_id {
        grads.register::<B>(id, B::linear_rows_backward_weight(x, grad.clone()));
    }
    if let Some(id) = b_id {
        grads.register::<B>(id, B::linear_rows_backward_bias(grad.clone()));
    }
    if let Some(id) = x_id {
        grads.register::<B>(id, B::linear_rows_backward_input(w, grad));
    }
}

impl<B: Backend + FlavaKernels, C: CheckpointStrategy> FlavaKernels for Autodiff<B, C> {
    fn exact_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ExactGelu;

        impl<B: Backend + FlavaKernels> Backward<B, 1> for ExactGelu {
            type State = B::FloatTensorPrimitive;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let input = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| B::exact_gelu_backward(input, grad));
            }
        }

        // Take the node guard before consuming the primitive (burn-autodiff's convention).
        let guard = x.node();
        let input = x.into_primitive();
        match ExactGelu.prepare::<C>([guard]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(input.clone(), B::exact_gelu(input)),
            OpsKind::UnTracked(prep) => prep.finish(B::exact_gelu(input)),
        }
    }

    fn softmax_cross_entropy(logits: FloatTensor<Self>, targets: Vec<usize>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SoftmaxCrossEntropy;

        impl<B: Backend + FlavaKernels> Backward<B, 1> for SoftmaxCrossEntropy {
            type State = (B::FloatTensorPrimitive, Vec<usize>);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let (logits, targets) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::softmax_cross_entropy_backward(logits, targets, grad)
                });
            }
        }

        let guard = logits.node();
        let input = logits.into_primitive();
        match SoftmaxCrossEntropy.prepare::<C>([guard]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::softmax_cross_entropy(input.clone(), targets.clone());
                prep.finish((input, targets), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::softmax_cross_entropy(input, targets)),
        }
    }

    fn layer_norm_rows(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormRows;

        impl<B: Backend + FlavaKernels> Backward<B, 3> for LayerNormRows {
            type State = (
                B::FloatTensorPrimitive,
                B::FloatTensorPrimitive,
                B::FloatTensorPrimitive,
            );

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, gamma, stats) = ops.state;
                let (dx, dgamma, dbeta) = B::layer_norm_rows_backward(x, gamma, stats, grad);
                for (node, g) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let guards = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
        match LayerNormRows.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, stats) = B::layer_norm_rows_with_stats(x.clone(), gamma.clone(), beta, eps);
                prep.finish((x, gamma, stats), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::layer_norm_rows(x, gamma, beta, eps)),
        }
    }

    fn attention_softmax(scores: FloatTensor<Self>, scale: f64, key_padding: Vec<bool>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionSoftmax;

        impl<B: Backend + FlavaKernels> Backward<B, 1> for AttentionSoftmax {
            type State = (B::FloatTensorPrimitive, f64);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let (probs, scale) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::attention_softmax_backward(probs, scale, grad)
                });
            }
        }

        let guard = scores.node();
        let scores = scores.into_primitive();
        match AttentionSoftmax.prepare::<C>([guard]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let probs = B::attention_softmax(scores, scale, key_padding);
                prep.finish((probs.clone(), scale), probs)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::attention_softmax(scores, scale, key_padding)),
        }
    }

    fn multi_head_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
        scale: f64,
        key_padding: Vec<bool>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MultiHeadAttention;

        /// q, k, v, the probabilities and the scale.
        type Saved<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f64);

        impl<B: Backend + FlavaKernels> Backward<B, 3> for MultiHeadAttention {
            type State = Saved<B>;

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v, probs, scale) = ops.state;
                let (dq, dk, dv) = B::multi_head_attention_backward(q, k, v, probs, scale, grad);
                for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        let guards = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        match MultiHeadAttention.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (ctx, probs) =
                    B::multi_head_attention_probs(q.clone(), k.clone(), v.clone(), heads, scale, key_padding);
                prep.finish((q, k, v, probs, scale), ctx)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::multi_head_attention(q, k, v, heads, scale, key_padding)),
        }
    }

    fn multi_head_attention_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
        scale: f64,
        key_padding: Vec<bool>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (q, k, v, heads, scale, key_padding);
        unreachable!("multi_head_attention_probs is called on the inner backend only")
    }

    fn linear_rows_forward(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearRows;

        impl<B: Backend + FlavaKernels> Backward<B, 3> for LinearRows {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, w) = ops.state;
                register_linear_grads::<B>(grads, ops.parents.map(|n| n.map(|n| n.id)), x, w, grad);
            }
        }

        let guards = [x.node(), w.node(), b.node()];
        let (x, w, b) = (x.into_primitive(), w.into_primitive(), b.into_primitive());
        match LinearRows.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::linear_rows_forward(x.clone(), w.clone(), b);
                prep.finish((x, w), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_rows_forward(x, w, b)),
        }
    }

    fn linear_rows_residual_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        r: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearRowsResidual;

        impl<B: Backend + FlavaKernels> Backward<B, 4> for LinearRowsResidual {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_w, node_b, node_r] = ops.parents.map(|n| n.map(|n| n.id));
                let grad = grads.consume::<B>(&ops.node);
                let (x, w) = ops.state;
                // The residual's gradient is the output's.
                if let Some(id) = node_r {
                    grads.register::<B>(id, grad.clone());
                }
                register_linear_grads::<B>(grads, [node_x, node_w, node_b], x, w, grad);
            }
        }

        let guards = [x.node(), w.node(), b.node(), r.node()];
        let (x, w, b, r) = (
            x.into_primitive(),
            w.into_primitive(),
            b.into_primitive(),
            r.into_primitive(),
        );
        match LinearRowsResidual.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::linear_rows_residual_forward(x.clone(), w.clone(), b, r);
                prep.finish((x, w), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_rows_residual_forward(x, w, b, r)),
        }
    }

    fn linear_rows_backward_input(w: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = (w, grad);
        unreachable!("linear_rows_backward_input is called on the inner backend only")
    }

    fn linear_rows_backward_weight(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = (x, grad);
        unreachable!("linear_rows_backward_weight is called on the inner backend only")
    }

    fn linear_rows_backward_bias(grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = grad;
        unreachable!("linear_rows_backward_bias is called on the inner backend only")
    }

    fn embedding_rows(table: FloatTensor<Self>, ids: Vec<usize>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct EmbeddingRows;

        impl<B: Backend + FlavaKernels> Backward<B, 1> for EmbeddingRows {
            type State = (Vec<usize>, usize);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let (ids, vocab) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    B::embedding_rows_backward(grad, ids, vocab)
                });
            }
        }

        let guard = table.node();
        let table = table.into_primitive();
        match EmbeddingRows.prepare::<C>([guard]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let vocab = burn::backend::TensorMetadata::shape(&table).dims::<2>()[0];
                let out = B::embedding_rows(table, ids.clone());
                prep.finish((ids, vocab), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::embedding_rows(table, ids)),
        }
    }

    fn embedding_rows_backward(grad: FloatTensor<Self>, ids: Vec<usize>, vocab: usize) -> FloatTensor<Self> {
        let _ = (grad, ids, vocab);
        unreachable!("embedding_rows_backward is called on the inner backend only")
    }

    fn sum_of_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = x;
        unreachable!("sum_of_squares is called without autodiff only (see `kernels::sum_of_squares`)")
    }

    fn multi_head_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        scale: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (q, k, v, probs, scale, grad);
        unreachable!("multi_head_attention_backward is called on the inner backend only")
    }

    // The backward kernels are called on the inner backend only (by the backward passes above);
    // second derivatives are not needed for training.
    fn exact_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = (x, grad);
        unreachable!("exact_gelu_backward is called on the inner backend only")
    }

    fn softmax_cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: Vec<usize>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let _ = (logits, targets, grad);
        unreachable!("softmax_cross_entropy_backward is called on the inner backend only")
    }

    fn layer_norm_rows_with_stats(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (x, gamma, beta, eps);
        unreachable!("layer_norm_rows_with_stats is called on the inner backend only")
    }

    fn layer_norm_rows_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = (x, gamma, stats, grad);
        unreachable!("layer_norm_rows_backward is called on the inner backend only")
    }

    fn attention_softmax_backward(probs: FloatTensor<Self>, scale: f64, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let _ = (probs, scale, grad);
        unreachable!("attention_softmax_backward is called on the inner backend only")
    }
}

/// Runs `f` on the f32 values of `tensors`, in place, and of `read`, and gives the tensors back:
/// how the fused AdamW updates parameters and moments without the three copies per tensor that
/// `into_data`, `try_into_vec` and `from_data` make (measured: `memmove` was 9% of a `small`
/// text-only step, most of it the optimizer's). A buffer that another tensor shares is copied
/// once first (copy on write), so no other tensor sees the change. Autodiff tensors come back
/// as autodiff tensors (new leaves).
///
/// # Panics
/// If a tensor is not a flex f32 tensor (see [`on_flex_f32`]) or the shapes differ.
pub fn update_f32_in_place<const D: usize, const N: usize>(
    tensors: [Tensor<D>; N],
    read: Tensor<D>,
    f: impl FnOnce([&mut [f32]; N], &[f32]),
) -> [Tensor<D>; N] {
    let shape = read.shape();
    let n = shape.num_elements();
    let flex = |t: Tensor<D>| -> FlexTensor {
        assert!(on_flex_f32(&t), "update_f32_in_place takes flex f32 tensors");
        assert_eq!(t.shape(), shape, "update_f32_in_place takes tensors of one shape");
        let t = t
            .without_autodiff()
            .try_into_primitive::<Flex>()
            .expect("a flex float tensor");
        // A view (offset, strides, a larger buffer) becomes a buffer of exactly its values.
        if t.layout().contiguous_offsets() == Some((0, n)) {
            t
        } else {
            t.to_contiguous()
        }
    };
    let autodiff: [bool; N] = std::array::from_fn(|i| tensors[i].is_autodiff());
    let mut owned: [FlexTensor; N] = tensors.map(flex);
    let read = flex(read);
    {
        let values: [&mut [f32]; N] = owned.each_mut().map(|t| &mut t.storage_mut::<f32>()[..n]);
        f(values, &read.storage::<f32>()[..n]);
    }
    let mut i = 0;
    owned.map(|t| {
        let t = Tensor::<D>::from_primitive::<Flex>(t);
        i += 1;
        if autodiff[i - 1] {
            t.autodiff()
        } else {
            t
        }
    })
}

/// `t` itself when its f32 data is contiguous, else a contiguous copy.
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// A new vector of `len` f32 that `write` fills, without the zero-fill pass a `vec![0.0; len]`
/// makes first (a memset of the whole output: 1-2% of a training step, over GELU and LayerNorm).
/// Returns the vector and what `write` returns.
///
/// # Safety
/// `write` must write every element of the slice it gets before anything reads it, and must not
/// read an element it has not written (the memory starts uninitialised).
pub(crate) unsafe fn written_f32<R>(len: usize, write: impl FnOnce(&mut [f32]) -> R) -> (Vec<f32>, R) {
    let mut v = Vec::<f32>::with_capacity(len);
    // SAFETY: the allocation holds `len` f32 (any bit pattern is a valid f32); the caller
    // writes each one before it is read.
    let out = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr(), len) };
    let r = write(out);
    // SAFETY: the caller's contract: all `len` elements were written.
    unsafe { v.set_len(len) };
    (v, r)
}

/// Applies `f` to the contiguous f32 data of `inputs` (all of one shape), writing a new tensor.
/// `f` must write every element of its output chunk.
fn map_f32<const N: usize>(inputs: [FlexTensor; N], f: impl Fn([&[f32]; N], &mut [f32]) + Sync) -> FlexTensor {
    let shape = burn::backend::TensorMetadata::shape(&inputs[0]);
    let contiguous: [FlexTensor; N] = inputs.map(contiguous);
    let slices: [&[f32]; N] = std::array::from_fn(|i| contiguous[i].as_slice::<f32>().expect("contiguous f32 tensor"));
    // Chunks of 16 Ki elements: enough work per task for rayon, whole cache lines per chunk.
    const CHUNK: usize = 1 << 14;
    // SAFETY: the chunks cover the output and `f` (the element-wise kernels of this module,
    // zipped over the whole chunk) writes each element of its chunk without reading it.
    let (out, ()) = unsafe {
        written_f32(slices[0].len(), |out| {
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
                let start = i * CHUNK;
                let parts: [&[f32]; N] = std::array::from_fn(|k| &slices[k][start..start + o.len()]);
                f(parts, o);
            })
        })
    };
    FlexTensor::from_data(TensorData::new(out, shape))
}

#[cfg(test)]
mod tests {
    use super::gelu::{gelu_grad_one, gelu_grad_slice, gelu_one, gelu_slice};
    use super::math::{erf, exp_nonpositive};
    use super::*;

    /// The vectorised erf and exp against libm's (through f64), over the whole useful range.
    #[test]
    fn erf_and_exp_match_libm() {
        let mut worst_erf = 0f64;
        let mut worst_exp = 0f64;
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5; // [-6, 6]
            let want = erf_f64(x as f64);
            worst_erf = worst_erf.max((erf(x) as f64 - want).abs());
            let t = -0.5 * x * x;
            let want = (t as f64).exp();
            worst_exp = worst_exp.max(((exp_nonpositive(t) as f64 - want) / want).abs());
        }
        // The approximation itself is within 9e-8 (evaluated in f64); evaluating it in f32 adds
        // rounding, worst near |x| = 4 where erf is 1 - 1e-8: 4.5e-7 measured, 4 ulps of 1.0.
        assert!(worst_erf < 5e-7, "erf: max abs error {worst_erf}");
        assert!(worst_exp < 4e-7, "exp: max rel error {worst_exp}");
    }

    /// erf in f64 by its Taylor series (|x| < 3) and continued fraction (|x| ≥ 3); accurate to
    /// ~1e-15, enough to judge an f32 approximation.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            let mut term = a;
            let mut sum = a;
            let mut n = 0.0;
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = exp(-a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        r.copysign(x)
    }

    /// Values and gradients of [`gelu`] against Burn's (libm erf) on an autodiff flex device,
    /// on a transposed (non-contiguous) input; and the plain-device path. Tolerance 1e-6 absolute,
    /// relative to the size of the value.
    #[test]
    fn gelu_and_its_gradient_match_burns() {
        let device = Device::flex().autodiff();
        let xs: Vec<f32> = (0..4096).map(|i| (i as f32 - 2048.0) / 256.0).collect(); // [-8, 8)
        let ws: Vec<f32> = (0..4096).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let grads_of = |f: fn(Tensor<2>) -> Tensor<2>| {
            let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [64, 64]), &device).require_grad();
            let w = Tensor::<2>::from_data(TensorData::new(ws.clone(), [64, 64]), &device);
            let y = f(x.clone().swap_dims(0, 1));
            let grads = (y.clone() * w).sum().backward();
            let g = x.grad(&grads).expect("gradient of x");
            (
                y.into_data().try_into_vec::<f32>().expect("f32 data"),
                g.into_data().try_into_vec::<f32>().expect("f32 data"),
            )
        };
        let (y, g) = grads_of(gelu);
        let (y_ref, g_ref) = grads_of(burn::tensor::activation::gelu);
        for (a, b) in y.iter().zip(&y_ref).chain(g.iter().zip(&g_ref)) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let plain = Tensor::<2>::from_data(TensorData::new(xs.clone(), [64, 64]), &Device::flex());
        let y_plain = gelu(plain).into_data().try_into_vec::<f32>().expect("f32 data");
        for (i, a) in y_plain.iter().enumerate() {
            let b = 0.5 * xs[i] as f64 * (1.0 + erf_f64(xs[i] as f64 * std::f64::consts::FRAC_1_SQRT_2));
            assert!((*a as f64 - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // A uniquely held input is overwritten in place; a shared one must be left as it was.
        let shared = Tensor::<2>::from_data(TensorData::new(xs.clone(), [64, 64]), &Device::flex());
        let y_shared = gelu(shared.clone())
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 data");
        assert_eq!(y_shared, y_plain, "the same GELU in place and into a new tensor");
        assert_eq!(
            shared.into_data().try_into_vec::<f32>().expect("f32 data"),
            xs,
            "the shared input unchanged"
        );
    }

    /// Row losses and the logits' gradient against Burn's `log_softmax` + `gather`, on an autodiff
    /// flex device: 37 rows of 1000 classes (not a multiple of the 16 lanes), logits up to ±30,
    /// a transposed input, uneven upstream gradients. Tolerance 1e-5 on losses of order 10 (f32
    /// sums over 1000 terms), 1e-6 on gradients.
    #[test]
    fn cross_entropy_and_its_gradient_match_burns() {
        let device = Device::flex().autodiff();
        let (n, c) = (37, 1000);
        let xs: Vec<f32> = (0..n * c)
            .map(|i| ((i * 7919 % 6007) as f32 / 6007.0 - 0.5) * 60.0)
            .collect();
        let targets: Vec<usize> = (0..n).map(|i| i * 131 % c).collect();
        let weights: Vec<f32> = (0..n).map(|i| 0.5 + i as f32 / 10.0).collect();
        let run = |fused: bool| {
            let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [c, n]), &device).require_grad();
            let logits = x.clone().swap_dims(0, 1);
            let rows = if fused {
                cross_entropy_rows(logits, &targets)
            } else {
                cross_entropy_rows_composed(logits, &targets)
            };
            let w = Tensor::<1>::from_data(TensorData::new(weights.clone(), [n]), &device);
            let grads = (rows.clone() * w).sum().backward();
            let g = x.grad(&grads).expect("gradient of x");
            (
                rows.into_data().try_into_vec::<f32>().expect("f32 data"),
                g.into_data().try_into_vec::<f32>().expect("f32 data"),
            )
        };
        let (loss, grad) = run(true);
        let (loss_ref, grad_ref) = run(false);
        for (a, b) in loss.iter().zip(&loss_ref) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "loss {a} vs {b}");
        }
        for (a, b) in grad.iter().zip(&grad_ref) {
            assert!((a - b).abs() <= 1e-6, "gradient {a} vs {b}");
        }
        assert!(loss.iter().all(|l| *l > 0.0));
        // A NaN logit gives a NaN loss (the training loop's guard counts it), in the vector
        // lanes (index 3) and in the tail after the last whole 16 (index 999); -inf does not.
        for (at, value, nan) in [
            (3, f32::NAN, true),
            (c - 1, f32::NAN, true),
            (5, f32::NEG_INFINITY, false),
        ] {
            let mut bad = xs[..c].to_vec();
            bad[at] = value;
            let bad = Tensor::<2>::from_data(TensorData::new(bad, [1, c]), &Device::flex());
            let l: f32 = cross_entropy_rows(bad, &[0]).into_scalar();
            assert_eq!(l.is_nan(), nan, "{value} at {at}: loss {l}");
        }
    }

    /// LayerNorm values and the gradients of x, gamma and beta against the same computed in f64,
    /// on an autodiff flex device: rows of 100 (not a multiple of the 16 lanes) and 128, a
    /// transposed input with an offset of 50 (the variance is taken about the mean), FLAVA's eps
    /// 1e-12. Tolerance 1e-6 relative on values (f32 rounding of x̂·γ + β, ~2 ulps), 1e-5 relative
    /// on gradients (sums over 37 rows).
    #[test]
    fn layer_norm_and_its_gradients_match_f64() {
        let device = Device::flex().autodiff();
        for d in [100usize, 128] {
            let n = 37;
            // xs[j * n + i] is x[i][j] (the input is transposed).
            let xs: Vec<f32> = (0..n * d)
                .map(|i| 50.0 + ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 6.0)
                .collect();
            let gs: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.2).collect();
            let bs: Vec<f32> = (0..d).map(|i| (i % 5) as f32 * 0.1 - 0.2).collect();
            let ws: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let x = Tensor::<2>::from_data(TensorData::new(xs.clone(), [d, n]), &device).require_grad();
            let g = Tensor::<1>::from_data(TensorData::new(gs.clone(), [d]), &device).require_grad();
            let b = Tensor::<1>::from_data(TensorData::new(bs.clone(), [d]), &device).require_grad();
            let y = layer_norm(x.clone().swap_dims(0, 1), g.clone(), b.clone(), 1e-12);
            let w = Tensor::<2>::from_data(TensorData::new(ws.clone(), [n, d]), &device);
            let grads = (y.clone() * w).sum().backward();
            let v = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().expect("f32 data");
            let v1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().expect("f32 data");
            let (y, dx) = (v(y), v(x.grad(&grads).expect("dx")));
            let (dg, db) = (v1(g.grad(&grads).expect("dgamma")), v1(b.grad(&grads).expect("dbeta")));
            // The reference in f64.
            let (mut dg0, mut db0) = (vec![0f64; d], vec![0f64; d]);
            for i in 0..n {
                let row: Vec<f64> = (0..d).map(|j| xs[j * n + i] as f64).collect();
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + 1e-12).sqrt();
                let xh: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
                let dy: Vec<f64> = (0..d).map(|j| ws[i * d + j] as f64).collect();
                let dyg: Vec<f64> = (0..d).map(|j| dy[j] * gs[j] as f64).collect();
                let a = dyg.iter().sum::<f64>() / d as f64;
                let bb = dyg.iter().zip(&xh).map(|(p, q)| p * q).sum::<f64>() / d as f64;
                for j in 0..d {
                    let want = xh[j] * gs[j] as f64 + bs[j] as f64;
                    let got = y[i * d + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "y (d = {d}): {got} vs {want}"
                    );
                    let want = rstd * (dyg[j] - a - xh[j] * bb);
                    let got = dx[j * n + i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "dx (d = {d}): {got} vs {want}"
                    );
                    dg0[j] += dy[j] * xh[j];
                    db0[j] += dy[j];
                }
            }
            for j in 0..d {
                let (a, r) = (dg[j] as f64, dg0[j]);
                assert!((a - r).abs() <= 1e-5 * (1.0 + r.abs()), "dgamma (d = {d}): {a} vs {r}");
                let (a, r) = (db[j] as f64, db0[j]);
                assert!((a - r).abs() <= 1e-5 * (1.0 + r.abs()), "dbeta (d = {d}): {a} vs {r}");
            }
        }
    }

    /// Attention probabilities and the scores' gradient against Burn's composed form (scale,
    /// mask addition of f32::MIN, softmax), with padded keys, 65 keys (not a multiple of 16), a
    /// transposed input; a NaN score makes its row NaN. Tolerance 1e-6 (probabilities ≤ 1).
    #[test]
    fn attention_softmax_and_its_gradient_match_burns() {
        let device = Device::flex().autodiff();
        let (b, h, q, s) = (3, 2, 5, 65);
        let xs: Vec<f32> = (0..b * h * q * s)
            .map(|i| ((i * 7919 % 6007) as f32 / 6007.0 - 0.5) * 40.0)
            .collect();
        let ws: Vec<f32> = (0..b * h * q * s)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        // Batch row 1 pads its last 20 keys; row 2 pads key 0.
        let pad: Vec<bool> = (0..b * s).map(|i| (i / s == 1 && i % s >= 45) || i == 2 * s).collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(pad.clone(), [b, s]), &device);
        let run = |fused: bool, masked: bool| {
            let x = Tensor::<4>::from_data(TensorData::new(xs.clone(), [b, h, s, q]), &device).require_grad();
            let scores = x.clone().swap_dims(2, 3);
            let m = masked.then_some(&mask);
            let y = if fused {
                attention_softmax(scores, 0.125, m)
            } else {
                attention_softmax_composed(scores, 0.125, m.map(|m| (m, b, s)))
            };
            let w = Tensor::<4>::from_data(TensorData::new(ws.clone(), [b, h, q, s]), &device);
            let grads = (y.clone() * w).sum().backward();
            let v = |t: Tensor<4>| t.into_data().try_into_vec::<f32>().expect("f32 data");
            (v(y), v(x.grad(&grads).expect("gradient of the scores")))
        };
        for masked in [false, true] {
            let (y, g) = run(true, masked);
            let (y0, g0) = run(false, masked);
            for (a, r) in y.iter().zip(&y0).chain(g.iter().zip(&g0)) {
                assert!((a - r).abs() <= 1e-6, "masked {masked}: {a} vs {r}");
            }
            if masked {
                // Padded keys get exactly zero probability.
                let p = &y[(h * q) * s + 50]; // batch row 1, head 0, query 0, key 50
                assert_eq!(*p, 0.0);
            }
        }
        let mut bad = xs[..s].to_vec();
        bad[7] = f32::NAN;
        let bad = Tensor::<4>::from_data(TensorData::new(bad, [1, 1, 1, s]), &Device::flex());
        let p = attention_softmax(bad, 1.0, None)
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 data");
        assert!(p.iter().all(|v| v.is_nan()), "a NaN score makes its row NaN");
    }

    /// The multi-head attention kernel against Burn's composed form (head split, batched
    /// matmuls, the softmax above): context and the gradients of q, k and v, with and without
    /// padded keys, over sizes that cross the gemm's blocks (37 positions, 4 heads of 16), a
    /// transposed (non-contiguous) input, and fewer queries than keys (1 and 5: a last layer
    /// that keeps the CLS row). Tolerance 2e-5 relative to the largest magnitude (the two sum
    /// the same products in different orders).
    #[test]
    fn multi_head_attention_and_its_gradients_match_burns() {
        let device = Device::flex().autodiff();
        let (b, s, d, heads) = (3, 37, 64, 4);
        let data = |n: usize, seed: usize, amp: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104729) % 6007) as f32 / 6007.0 - 0.5) * amp)
                .collect()
        };
        let (ks, vs) = (data(b * s * d, 2, 4.0), data(b * s * d, 3, 2.0));
        // Sample 1 pads its last 12 keys; sample 2 pads key 0.
        let pad: Vec<bool> = (0..b * s).map(|i| (i / s == 1 && i % s >= 25) || i == 2 * s).collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, s]), &device);
        let run = |fused: bool, masked: bool, sq: usize| {
            let (qs, ws) = (data(b * sq * d, 1, 4.0), data(b * sq * d, 4, 2.0));
            let t = |x: &Vec<f32>, rows: usize| {
                Tensor::<3>::from_data(TensorData::new(x.clone(), [b, rows, d]), &device).require_grad()
            };
            let (q, k) = (t(&qs, sq), t(&ks, s));
            // v as the transpose of a [b, d, s] tensor: a strided input.
            let vt = Tensor::<3>::from_data(TensorData::new(vs.clone(), [b, d, s]), &device).require_grad();
            let v = vt.clone().swap_dims(1, 2);
            let m = masked.then_some(&mask);
            let ctx = if fused {
                multi_head_attention(q.clone(), k.clone(), v, heads, m)
            } else {
                multi_head_attention_composed(q.clone(), k.clone(), v, heads, m)
            };
            assert_eq!(ctx.dims(), [b, sq, d]);
            let w = Tensor::<3>::from_data(TensorData::new(ws, [b, sq, d]), &device);
            let grads = (ctx.clone() * w).sum().backward();
            let val = |t: Tensor<3>| t.into_data().try_into_vec::<f32>().expect("f32 data");
            [
                val(ctx),
                val(q.grad(&grads).expect("dq")),
                val(k.grad(&grads).expect("dk")),
                val(vt.grad(&grads).expect("dv")),
            ]
        };
        for sq in [s, 1, 5] {
            for masked in [false, true] {
                let got = run(true, masked, sq);
                let want = run(false, masked, sq);
                for (name, (g, w)) in ["context", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                    let top = w.iter().fold(0f32, |a, v| a.max(v.abs()));
                    assert!(top > 1e-3, "{name} is not trivially zero");
                    for (a, r) in g.iter().zip(w) {
                        assert!(
                            (a - r).abs() <= 2e-5 * top,
                            "{sq} queries, masked {masked}, {name}: {a} vs {r}"
                        );
                    }
                }
            }
        }
        let qs = data(b * s * d, 1, 4.0);
        // A padded key gets no attention: its value never reaches the context.
        let x = Tensor::<3>::from_data(TensorData::new(qs.clone(), [b, s, d]), &Device::flex());
        let mut vs2 = vs.clone();
        vs2[(s + 30) * d] = 1e6; // sample 1, key 30 (padded), hidden 0
        let v2 = Tensor::<3>::from_data(TensorData::new(vs2, [b, s, d]), &Device::flex());
        let m = Tensor::<2, Bool>::from_data(mask.clone().into_data(), &Device::flex());
        let ctx = multi_head_attention(x.clone(), x, v2, heads, Some(&m));
        let top = ctx.abs().max().into_scalar::<f32>();
        assert!(top < 1e3, "the padded key's value leaked into the context ({top})");
    }

    /// The linear kernel against Burn's `linear`: output and the gradients of x, W and b, with
    /// and without a bias, one size on one thread and one above the parallel threshold, a
    /// transposed (strided) input, and a weight without gradient (a frozen tower: only dx).
    /// Tolerance 1e-5 relative to the largest magnitude (the gemm's blocking may order sums
    /// differently).
    /// The embedding kernel against Burn's lookup: the rows, and the table's gradient with ids
    /// that repeat (their rows add up) and rows never looked up (zero), used twice in one loss
    /// (the two gradients add). Exact: the same additions in the same order.
    #[test]
    fn embedding_and_its_gradient_match_burns() {
        let device = Device::flex().autodiff();
        let (vocab, d) = (50, 24);
        let table: Vec<f32> = (0..vocab * d)
            .map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect();
        let ids_a: Vec<i64> = (0..3 * 7).map(|i| (i * 13 % 17) as i64).collect(); // repeats, ids < 17
        let ids_b: Vec<i64> = (0..3 * 7).map(|i| (i * 5 % 23) as i64).collect();
        let g: Vec<f32> = (0..3 * 7 * d)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let run = |ours: bool| {
            let t = Tensor::<2>::from_data(TensorData::new(table.clone(), [vocab, d]), &device).require_grad();
            let lookup = |ids: &[i64]| {
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [3, 7]), &device);
                if ours {
                    embedding(t.clone(), ids)
                } else {
                    burn::tensor::module::embedding(t.clone(), ids)
                }
            };
            let (a, b) = (lookup(&ids_a), lookup(&ids_b));
            let gt = Tensor::<3>::from_data(TensorData::new(g.clone(), [3, 7, d]), &device);
            let grads = (a.clone() * gt.clone() + b * gt * 0.5).sum().backward();
            let v = |x: TensorData| x.try_into_vec::<f32>().expect("f32");
            (v(a.into_data()), v(t.grad(&grads).expect("table gradient").into_data()))
        };
        let (got, want) = (run(true), run(false));
        assert_eq!(got.0, want.0, "looked-up rows");
        assert_eq!(got.1.len(), vocab * d);
        for (i, (a, r)) in got.1.iter().zip(&want.1).enumerate() {
            assert!(
                (a - r).abs() <= 1e-6,
                "table gradient [{}, {}]: {a} vs {r}",
                i / d,
                i % d
            );
        }
        // Row 16 is looked up by ids_a, row 40 by neither.
        assert!(got.1[16 * d..17 * d].iter().any(|&x| x != 0.0));
        assert!(got.1[40 * d..41 * d].iter().all(|&x| x == 0.0));
    }

    /// An id outside the table is refused by name, not read out of bounds.
    #[test]
    #[should_panic(expected = "embedding id 9 is outside the table (4 rows)")]
    fn embedding_refuses_an_id_outside_the_table() {
        let device = Device::flex();
        let t = Tensor::<2>::zeros([4, 3], &device);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 9], [1, 2]), &device);
        let _ = embedding(t, ids);
    }

    #[test]
    fn linear_and_its_gradients_match_burns() {
        let device = Device::flex().autodiff();
        for (n, d_in, d_out) in [(5, 7, 3), (300, 200, 150)] {
            let data = |len: usize, seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| (((i * 7919 + seed * 104729) % 6007) as f32 / 6007.0 - 0.5) * 2.0)
                    .collect()
            };
            let (xs, ws, bs, gs) = (
                data(n * d_in, 1),
                data(d_in * d_out, 2),
                data(d_out, 3),
                data(n * d_out, 4),
            );
            for (bias, frozen) in [(true, false), (false, false), (true, true)] {
                let run = |fused: bool| {
                    // x as the transpose of an [in, n] tensor.
                    let xt = Tensor::<2>::from_data(TensorData::new(xs.clone(), [d_in, n]), &device).require_grad();
                    let w = Tensor::<2>::from_data(TensorData::new(ws.clone(), [d_in, d_out]), &device);
                    let w = if frozen { w } else { w.require_grad() };
                    let b = bias
                        .then(|| Tensor::<1>::from_data(TensorData::new(bs.clone(), [d_out]), &device).require_grad());
                    let x = xt.clone().transpose();
                    let y = if fused {
                        linear(x, w.clone(), b.clone())
                    } else {
                        burn::tensor::module::linear(x, w.clone(), b.clone())
                    };
                    let g = Tensor::<2>::from_data(TensorData::new(gs.clone(), [n, d_out]), &device);
                    let grads = (y.clone() * g).sum().backward();
                    let v2 = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().expect("f32");
                    let v1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().expect("f32");
                    (
                        v2(y),
                        v2(xt.grad(&grads).expect("dx")),
                        w.grad(&grads).map(v2),
                        b.and_then(|b| b.grad(&grads)).map(v1),
                    )
                };
                let (got, want) = (run(true), run(false));
                let close = |name: &str, a: &[f32], r: &[f32]| {
                    assert_eq!(a.len(), r.len(), "{name}");
                    let top = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(top > 1e-3, "{name} is not trivially zero");
                    for (a, r) in a.iter().zip(r) {
                        assert!(
                            (a - r).abs() <= 1e-5 * top,
                            "{n}x{d_in}x{d_out} bias {bias} frozen {frozen}, {name}: {a} vs {r}"
                        );
                    }
                };
                close("y", &got.0, &want.0);
                close("dx", &got.1, &want.1);
                assert_eq!(
                    got.2.is_some(),
                    !frozen,
                    "a weight gradient exactly when the weight trains"
                );
                if let (Some(a), Some(r)) = (&got.2, &want.2) {
                    close("dW", a, r);
                }
                assert_eq!(got.3.is_some(), bias);
                if let (Some(a), Some(r)) = (&got.3, &want.3) {
                    close("db", a, r);
                }
            }
        }
    }

    /// The one-pass sum of squares against an f64 sum, on a tensor of an autodiff device with a
    /// gradient, a transposed one, and sizes that are not multiples of the lane count or chunk.
    /// `linear_residual` against Burn's `linear(..) + r`: the output and every gradient, with the
    /// residual also used elsewhere in the loss (its gradient is the sum of both uses), with and
    /// without a bias; tolerance 1e-5 of the largest reference value.
    #[test]
    fn linear_residual_and_its_gradients_match_burns() {
        let device = Device::flex().autodiff();
        for (n, d_in, d_out, bias) in [(5, 7, 3, true), (300, 200, 150, true), (70, 33, 65, false)] {
            let data = |len: usize, seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| (((i * 7919 + seed * 104729) % 6007) as f32 / 6007.0 - 0.5) * 2.0)
                    .collect()
            };
            let (xs, ws, bs, rs, gs) = (
                data(n * d_in, 1),
                data(d_in * d_out, 2),
                data(d_out, 3),
                data(n * d_out, 5),
                data(n * d_out, 4),
            );
            let run = |fused: bool| {
                let t2 = |v: &Vec<f32>, shape: [usize; 2]| {
                    Tensor::<2>::from_data(TensorData::new(v.clone(), shape), &device).require_grad()
                };
                let (x, w, r) = (t2(&xs, [n, d_in]), t2(&ws, [d_in, d_out]), t2(&rs, [n, d_out]));
                let b =
                    bias.then(|| Tensor::<1>::from_data(TensorData::new(bs.clone(), [d_out]), &device).require_grad());
                let y = if fused {
                    linear_residual(x.clone(), w.clone(), b.clone(), r.clone())
                } else {
                    burn::tensor::module::linear(x.clone(), w.clone(), b.clone()) + r.clone()
                };
                let g = Tensor::<2>::from_data(TensorData::new(gs.clone(), [n, d_out]), &device);
                // r also enters the loss on its own: its gradient is g + 2·r·0.5.
                let loss = (y.clone() * g).sum() + (r.clone() * r.clone()).sum() * 0.5;
                let grads = loss.backward();
                let v2 = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().expect("f32");
                let v1 = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().expect("f32");
                (
                    v2(y),
                    v2(x.grad(&grads).expect("dx")),
                    v2(w.grad(&grads).expect("dW")),
                    v2(r.grad(&grads).expect("dr")),
                    b.and_then(|b| b.grad(&grads)).map(v1),
                )
            };
            let (got, want) = (run(true), run(false));
            let close = |name: &str, a: &[f32], r: &[f32]| {
                assert_eq!(a.len(), r.len(), "{name}");
                let top = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(top > 1e-3, "{name} is not trivially zero");
                for (a, r) in a.iter().zip(r) {
                    assert!((a - r).abs() <= 1e-5 * top, "{n}x{d_in}x{d_out}, {name}: {a} vs {r}");
                }
            };
            close("y", &got.0, &want.0);
            close("dx", &got.1, &want.1);
            close("dW", &got.2, &want.2);
            close("dr", &got.3, &want.3);
            assert_eq!(got.4.is_some(), bias);
            if let (Some(a), Some(r)) = (&got.4, &want.4) {
                close("db", a, r);
            }
        }
    }

    /// `update_f32_in_place` on a view (a slice of a larger tensor), on a tensor another one
    /// shares (which must not change), and on an autodiff tensor (which comes back autodiff).
    #[test]
    fn in_place_updates_leave_shared_buffers_alone() {
        let device = Device::flex();
        let big = Tensor::<1>::from_data(
            TensorData::new((0..10).map(|i| i as f32).collect::<Vec<_>>(), [10]),
            &device,
        );
        let view = big.clone().narrow(0, 2, 4);
        let shared = Tensor::<1>::from_data(TensorData::new(vec![1f32, 2.0, 3.0, 4.0], [4]), &device);
        let kept = shared.clone();
        let tracked = Tensor::<1>::from_data(TensorData::new(vec![0f32; 4], [4]), &device.clone().autodiff());
        let read = Tensor::<1>::from_data(TensorData::new(vec![10f32, 20.0, 30.0, 40.0], [4]), &device);
        let [a, b, c] = update_f32_in_place([view, shared, tracked], read, |[a, b, c], r| {
            for i in 0..4 {
                a[i] += r[i];
                b[i] *= r[i];
                c[i] = -r[i];
            }
        });
        let v = |t: Tensor<1>| t.into_data().try_into_vec::<f32>().expect("f32");
        assert_eq!(v(a), [12.0, 23.0, 34.0, 45.0]);
        assert_eq!(v(b), [10.0, 40.0, 90.0, 160.0]);
        assert!(c.is_autodiff(), "an autodiff tensor comes back autodiff");
        assert_eq!(v(c), [-10.0, -20.0, -30.0, -40.0]);
        assert_eq!(
            v(kept),
            [1.0, 2.0, 3.0, 4.0],
            "the tensor sharing the buffer is unchanged"
        );
        assert_eq!(
            v(big),
            (0..10).map(|i| i as f32).collect::<Vec<_>>(),
            "the viewed tensor is unchanged"
        );
    }

    #[test]
    fn sum_of_squares_matches_f64() {
        for n in [1usize, 7, 1000, 70_001] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 6007) as f32 / 6007.0 - 0.5) * 3.0)
                .collect();
            let want: f64 = xs.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let t = Tensor::<1>::from_data(TensorData::new(xs.clone(), [n]), &Device::flex().autodiff()).require_grad();
            let got = sum_of_squares(&t);
            assert!((got - want).abs() <= 1e-12 * want.max(1.0), "n = {n}: {got} vs {want}");
        }
        let xs: Vec<f32> = (0..6 * 35).map(|i| i as f32 * 0.25 - 20.0).collect();
        let want: f64 = xs.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let t = Tensor::<2>::from_data(TensorData::new(xs, [6, 35]), &Device::flex()).transpose();
        assert!((sum_of_squares(&t) - want).abs() <= 1e-9 * want);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn multiversioned_slices_agree_with_scalar_code() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut out = vec![0f32; 1000];
        gelu_slice(&x, &mut out);
        for (o, &x) in out.iter().zip(&x) {
            assert!((o - gelu_one(x)).abs() <= 1e-6 * (1.0 + x.abs()));
        }
        gelu_grad_slice(&x, &g, &mut out);
        for ((o, &x), &g) in out.iter().zip(&x).zip(&g) {
            assert!((o - gelu_grad_one(x, g)).abs() <= 1e-6 * (1.0 + x.abs()));
        }
    }
}
