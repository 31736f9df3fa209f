//! FLAVA's global contrastive loss (HF `FlavaGlobalContrastiveHead` with
//! `global_backprop_contrastive=True`): local embeddings scored against the embeddings of the
//! whole batch (every micro-batch, every device), with gradients through the local rows. The
//! global set is assembled by the caller: gradient accumulation and in-process data
//! parallelism build it from cached features ([`crate::pretraining::Contrastive::Cached`]).

use burn::prelude::*;

use crate::losses::{cross_entropy_sum, index_tensor};

/// HF's `LOGIT_SCALE_CLAMP_MAX` (≈ ln 100, written 4.6052 there; the exact ln 100 would shift
/// the logits by 3e-5 relative): `logit_scale` is clamped to `[0, 4.6052]` during training.
pub const LOGIT_SCALE_MAX: f32 = 4.6052;

/// The clamped logit scale with HF's gradient: HF clamps the parameter in place (`.data.clamp_`)
/// and then differentiates `exp(logit_scale)` at the clamped value, so the gradient is not cut
/// by the clamp. `scale`: `[1]` → `[1]`.
pub fn clamp_logit_scale(scale: Tensor<1>) -> Tensor<1> {
    let clamped = scale.clone().clamp(0.0, LOGIT_SCALE_MAX);
    scale.clone() + (clamped - scale).detach()
}

/// What the contrastive loss computed.
#[derive(Debug, Clone)]
pub struct ContrastiveOutput {
    /// `(CE(logits_per_image) + CE(logits_per_text)) / 2` over the selected rows, `[1]`.
    pub loss: Tensor<1>,
    /// τ · u_rows · V_allᵀ: [rows, world·b].
    pub logits_per_image: Tensor<2>,
    /// τ · v_rows · U_allᵀ: [rows, world·b].
    pub logits_per_text: Tensor<2>,
    /// Number of rows the loss averages over.
    pub rows: usize,
}

/// The contrastive loss of local rows against a global set.
///
/// `image`, `text`: L2-normalised local embeddings [b, d]; `image_all`, `text_all`: the global
/// sets [n, d] whose rows `offset..offset + b` are the local ones; `scale`: the clamped logit
/// scale `[1]`; `rows`: the local rows that count (ITM positives), averaged over; columns are never
/// filtered.
pub fn contrastive_loss(
    image: Tensor<2>,
    text: Tensor<2>,
    image_all: Tensor<2>,
    text_all: Tensor<2>,
    offset: usize,
    scale: Tensor<1>,
    rows: &[usize],
) -> ContrastiveOutput {
    let device = image.device();
    let temperature = scale.exp().reshape([1, 1]);
    let sel = index_tensor(rows, &device);
    let (image, text) = (image.select(0, sel.clone()), text.select(0, sel));
    let logits_per_image = image.matmul(text_all.transpose()) * temperature.clone();
    let logits_per_text = text.matmul(image_all.transpose()) * temperature;
    let labels: Vec<usize> = rows.iter().map(|r| offset + r).collect();
    let n = rows.len().max(1) as f64;
    let loss = (cross_entropy_sum(logits_per_image.clone(), &labels)
        + cross_entropy_sum(logits_per_text.clone(), &labels))
        / (2.0 * n);
    ContrastiveOutput {
        loss,
        logits_per_image,
        logits_per_text,
        rows: rows.len(),
    }
}
