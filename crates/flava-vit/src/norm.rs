//! LayerNorm with its epsilon carried in the module (FLAVA's 1e-12, not Burn's 1e-5 default),
//! computed by the one-pass kernels of [`crate::kernels::layer_norm`] on flex devices. Parameter
//! names (`gamma`, `beta`) are Burn's, so checkpoints load as before (HF `weight`/`bias`).

use burn::module::{Initializer, Module, Param};
use burn::prelude::*;

/// LayerNorm over the last dimension: `(x − mean)/√(var + eps)·gamma + beta`.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale `[d]` (HF `weight`).
    pub gamma: Param<Tensor<1>>,
    /// Shift `[d]` (HF `bias`).
    pub beta: Param<Tensor<1>>,
    /// Added to the variance (FLAVA: 1e-12).
    #[module(skip)]
    pub epsilon: f64,
}

impl LayerNorm {
    /// A LayerNorm of width `d` with weight 1, bias 0 and epsilon `eps`.
    pub fn new(d: usize, eps: f64, device: &Device) -> Self {
        Self {
            gamma: Initializer::Ones.init([d], device),
            beta: Initializer::Zeros.init([d], device),
            epsilon: eps,
        }
    }

    /// Normalises `x` [.., d] over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::kernels::layer_norm(x, self.gamma.val(), self.beta.val(), self.epsilon)
    }
}
