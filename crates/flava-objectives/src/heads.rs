//! The pretraining heads (HF `FlavaMaskedPredictionHead`, `FlavaITMHead`). Field names follow
//! the checkpoint keys (`transform.dense`, `transform.LayerNorm`, `decoder`, `pooler.dense`,
//! `seq_relationship`).

use burn::module::Module;
use burn::nn::Linear;
use burn::prelude::*;
use flava_vit::encoder::{layer_norm, linear, linear_2d, HiddenAct, Pooler};
use flava_vit::LayerNorm;

/// `LayerNorm(act(dense(x)))` (HF `FlavaPredictionHeadTransform`).
#[derive(Module, Debug)]
pub struct HeadTransform {
    /// hidden → hidden.
    pub dense: Linear,
    /// Checkpoint key `transform.LayerNorm`.
    pub layer_norm: LayerNorm,
    /// The configuration's `hidden_act`.
    #[module(skip)]
    pub act: HiddenAct,
}

/// A masked-prediction head: transform, then `decoder` (hidden → vocab, with bias). HF's separate
/// `bias` parameter is the same tensor as `decoder.bias` (tied); checkpoints may hold either key.
#[derive(Module, Debug)]
pub struct MaskedPredictionHead {
    /// Dense + activation + LayerNorm.
    pub transform: HeadTransform,
    /// hidden → vocab.
    pub decoder: Linear,
}

impl MaskedPredictionHead {
    /// A head initialised as HF does (weights N(0, std), biases 0, LayerNorm 1/0).
    pub fn new(hidden: usize, vocab: usize, act: HiddenAct, eps: f64, std: f64, device: &Device) -> Self {
        Self {
            transform: HeadTransform {
                dense: linear(hidden, hidden, true, std, device),
                layer_norm: layer_norm(hidden, eps, device),
                act,
            },
            decoder: linear(hidden, vocab, true, std, device),
        }
    }

    /// Logits of the selected positions: [n, hidden] → [n, vocab].
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let t = &self.transform;
        let x = t.layer_norm.forward(t.act.apply(linear_2d(&t.dense, x)));
        linear_2d(&self.decoder, x)
    }
}

/// Image-text matching head: its own tanh pooler on token 0, then a 2-way classifier
/// (index 1 = "matches").
#[derive(Module, Debug)]
pub struct ItmHead {
    /// `tanh(dense(x[:, 0]))`.
    pub pooler: Pooler,
    /// hidden → 2.
    pub seq_relationship: Linear,
}

impl ItmHead {
    /// A head initialised as HF does.
    pub fn new(hidden: usize, std: f64, device: &Device) -> Self {
        Self {
            pooler: Pooler::new(hidden, std, device),
            seq_relationship: linear(hidden, 2, true, std, device),
        }
    }

    /// Multimodal states [batch, seq, hidden] → logits [batch, 2].
    pub fn forward(&self, states: Tensor<3>) -> Tensor<2> {
        linear_2d(&self.seq_relationship, self.pooler.forward(states))
    }

    /// Softmax probability of "matches" per pair: [batch, seq, hidden] → `[batch]`.
    pub fn match_probability(&self, states: Tensor<3>) -> Tensor<1> {
        let p = burn::tensor::activation::softmax(self.forward(states), 1);
        let b = p.dims()[0];
        p.slice(s![.., 1..2]).reshape([b])
    }
}
