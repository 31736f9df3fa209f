//! FLAVA's global contrastive loss (HF `FlavaGlobalContrastiveHead` with
//! `global_backprop_contrastive=True`): each rank scores its local embeddings against the
//! embeddings of every rank, and gradients of the gathered copies flow back to their owners.
//!
//! The gather is an all-reduce (sum) of a zero matrix holding the local rows in this rank's slot:
//! its backward is again an all-reduce, which hands each owner the sum of the gradients every rank
//! computed for its rows, as `torch.distributed.nn.functional.all_gather` does.

use burn::prelude::*;
use burn::tensor::distributed::{all_reduce, ReduceOperation};

use crate::losses::{cross_entropy_sum, index_tensor};

/// HF's `LOGIT_SCALE_CLAMP_MAX` (≈ ln 100, written 4.6052 there; the exact ln 100 would shift
/// the logits by 3e-5 relative): `logit_scale` is clamped to `[0, 4.6052]` during training.
pub const LOGIT_SCALE_MAX: f32 = 4.6052;

/// The clamped logit scale with HF's gradient: HF clamps the parameter in place (`.data.clamp_`)
/// and then differentiates `exp(logit_scale)` at the clamped value, so the gradient is not cut
/// by the clamp. `scale`: [1] → [1].
pub fn clamp_logit_scale(scale: Tensor<1>) -> Tensor<1> {
    let clamped = scale.clone().clamp(0.0, LOGIT_SCALE_MAX);
    scale.clone() + (clamped - scale).detach()
}

/// How local contrastive embeddings become the global set.
pub trait EmbeddingGather {
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// This rank's index.
    fn rank(&self) -> usize;
    /// Local [b, d] → global [world·b, d] in rank order, differentiable back to every owner.
    fn gather(&self, local: Tensor<2>) -> Tensor<2>;
}

/// A single device: the global set is the local one.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalGather;

impl EmbeddingGather for LocalGather {
    fn world_size(&self) -> usize {
        1
    }
    fn rank(&self) -> usize {
        0
    }
    fn gather(&self, local: Tensor<2>) -> Tensor<2> {
        local
    }
}

/// Gathers across the devices of a Burn `DistributedContext` (CUDA data parallelism) with the
/// differentiable all-reduce. Every rank must hold the same local batch size.
#[derive(Debug, Clone)]
pub struct AllReduceGather {
    /// This rank's index in `devices`.
    pub rank: usize,
    /// Every participating device, in rank order.
    pub devices: Vec<Device>,
}

impl EmbeddingGather for AllReduceGather {
    fn world_size(&self) -> usize {
        self.devices.len()
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn gather(&self, local: Tensor<2>) -> Tensor<2> {
        let [b, d] = local.dims();
        let w = self.devices.len();
        let device = local.device();
        let before = Tensor::<2>::zeros([self.rank * b, d], &device);
        let after = Tensor::<2>::zeros([(w - self.rank - 1) * b, d], &device);
        let slot = Tensor::cat(vec![before, local, after], 0);
        all_reduce(slot, ReduceOperation::Sum, self.devices.clone()).resolve()
    }
}

/// What the contrastive loss computed.
#[derive(Debug, Clone)]
pub struct ContrastiveOutput {
    /// `(CE(logits_per_image) + CE(logits_per_text)) / 2` over the selected rows, [1].
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
/// scale [1]; `rows`: the local rows that count (ITM positives), columns are never filtered.
/// `denominator` overrides the number of rows averaged over (gradient accumulation).
#[allow(clippy::too_many_arguments)]
pub fn contrastive_loss(
    image: Tensor<2>,
    text: Tensor<2>,
    image_all: Tensor<2>,
    text_all: Tensor<2>,
    offset: usize,
    scale: Tensor<1>,
    rows: &[usize],
    denominator: Option<usize>,
) -> ContrastiveOutput {
    let device = image.device();
    let temperature = scale.exp().reshape([1, 1]);
    let sel = index_tensor(rows, &device);
    let (image, text) = (image.select(0, sel.clone()), text.select(0, sel));
    let logits_per_image = image.matmul(text_all.transpose()) * temperature.clone();
    let logits_per_text = text.matmul(image_all.transpose()) * temperature;
    let labels: Vec<usize> = rows.iter().map(|r| offset + r).collect();
    let n = denominator.unwrap_or(rows.len()).max(1) as f64;
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
