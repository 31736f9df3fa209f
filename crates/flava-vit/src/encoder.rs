//! The pre-LN transformer encoder shared by FLAVA's three towers.
//!
//! Reproduces Hugging Face `FlavaLayer` / `FlavaEncoder` (transformers `models/flava/modeling_flava.py`):
//! `x = x + W_o·Attn(LN_before(x)); x = x + W_2·GELU(W_1·LN_after(x))`, exact (erf) GELU, LayerNorm eps
//! from the config (1e-12 in FLAVA), dropout 0. Field names follow the checkpoint keys
//! (`layer.{i}.attention.attention.query`, `…attention.output.dense`, `…intermediate.dense`,
//! `…output.dense`, `…layernorm_before`, `…layernorm_after`) so weights load without a renaming table.

use burn::module::{Initializer, Module};
use burn::nn::{Linear, LinearConfig};

pub use crate::norm::LayerNorm;
use burn::prelude::*;
use burn::tensor::activation::{gelu_approximate, relu, tanh};
use serde::{Deserialize, Serialize};

/// Activation function of the feed-forward block, as named in HF configs (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HiddenAct {
    /// Exact GELU with erf (`"gelu"`), FLAVA's choice.
    #[default]
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    /// ReLU (`"relu"`).
    #[serde(rename = "relu")]
    Relu,
}

impl HiddenAct {
    /// Applies the activation element-wise.
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            HiddenAct::Gelu => crate::kernels::gelu(x),
            HiddenAct::GeluTanh => gelu_approximate(x),
            HiddenAct::Relu => relu(x),
        }
    }
}

/// Shape of one transformer encoder: everything a tower's layers need to know.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads; `hidden_size` must be divisible by it.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// LayerNorm epsilon (FLAVA: 1e-12; Burn's default 1e-5 is wrong here).
    pub layer_norm_eps: f64,
    /// Whether query/key/value projections have a bias.
    pub qkv_bias: bool,
    /// Feed-forward activation.
    pub hidden_act: HiddenAct,
    /// Standard deviation of the normal initialiser (HF `initializer_range`).
    pub initializer_range: f64,
}

/// A `Linear` initialised as HF does: weight N(0, std), bias 0.
pub fn linear(d_in: usize, d_out: usize, bias: bool, std: f64, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

/// A LayerNorm with an explicit epsilon (weight 1, bias 0).
pub fn layer_norm(d: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNorm::new(d, eps, device)
}

/// `layer` applied to every position of `x` [batch, seq, d_in] as one `[batch·seq, d_in]` matmul
/// → [batch, seq, d_out]. Burn's `Linear` keeps a batched matmul (one gemm per sample, each
/// re-packing the weight) when `seq` is a multiple of 32, as text of 32 tokens is: 3-4x slower
/// backward on the CPU.
pub fn linear_rows(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, s, d] = x.dims();
    let y = crate::kernels::linear(
        x.reshape([b * s, d]),
        layer.weight.val(),
        layer.bias.as_ref().map(|b| b.val()),
    );
    let out = y.dims()[1];
    y.reshape([b, s, out])
}

/// `residual + layer(x)` for `x` [batch, seq, d_in] and `residual` [batch, seq, d_out]: as
/// [`linear_rows`], with the residual added in the pass that writes the bias (a pre-LN layer's
/// skip connection without a tensor and a pass of its own).
pub fn linear_rows_residual(layer: &Linear, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
    let [b, s, d] = x.dims();
    let out = layer.weight.dims()[1];
    let y = crate::kernels::linear_residual(
        x.reshape([b * s, d]),
        layer.weight.val(),
        layer.bias.as_ref().map(|b| b.val()),
        residual.reshape([b * s, out]),
    );
    y.reshape([b, s, out])
}

/// `layer` applied to the rows of `x` [n, d_in] → [n, d_out]: the one-gemm linear kernel on flex
/// (Burn's `Linear::forward` allocates its matmul output zero-filled, copies it, and adds the
/// bias as a second operation; for the MLM head's [n, 30522] logits that is most of the head).
pub fn linear_2d(layer: &Linear, x: Tensor<2>) -> Tensor<2> {
    crate::kernels::linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// Wraps one `Linear` under the field name `dense`, as HF nests it.
#[derive(Module, Debug)]
pub struct Dense {
    /// The projection.
    pub dense: Linear,
}

impl Dense {
    /// Builds `Linear(d_in → d_out)` with bias.
    pub fn new(d_in: usize, d_out: usize, std: f64, device: &Device) -> Self {
        Self {
            dense: linear(d_in, d_out, true, std, device),
        }
    }
}

/// Query, key and value projections (`attention.attention` in HF).
#[derive(Module, Debug)]
pub struct SelfAttention {
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    /// Number of heads.
    pub num_heads: usize,
}

/// Self-attention plus its output projection (`attention` in HF).
#[derive(Module, Debug)]
pub struct Attention {
    /// q/k/v projections.
    pub attention: SelfAttention,
    /// Output projection (`attention.output.dense`).
    pub output: Dense,
}

impl Attention {
    /// `x`: [batch, seq, hidden]; `key_mask`: [batch, seq], `true` = padding (never attended).
    /// Returns [batch, seq, hidden].
    pub fn forward(&self, x: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        linear_rows(&self.output.dense, self.context(x, key_mask))
    }

    /// `residual + forward(x)`, the residual added by the output projection's kernel.
    pub fn forward_residual(&self, x: Tensor<3>, residual: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        linear_rows_residual(&self.output.dense, self.context(x, key_mask), residual)
    }

    /// The heads' context before the output projection, [batch, seq, hidden].
    fn context(&self, x: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        let q = linear_rows(&self.attention.query, x.clone());
        let k = linear_rows(&self.attention.key, x.clone());
        let v = linear_rows(&self.attention.value, x);
        crate::kernels::multi_head_attention(q, k, v, self.attention.num_heads, key_mask)
    }
}

/// Parameters of `layers` pre-LN layers of width `hidden` and FFN `intermediate` (u128: the
/// sizes may come from a hostile configuration).
pub fn encoder_parameter_estimate(hidden: usize, intermediate: usize, layers: usize) -> u128 {
    let (d, ff) = (hidden as u128, intermediate as u128);
    layers as u128 * (4 * d * d + 2 * d * ff + 9 * d + ff)
}

/// One pre-LN transformer layer (HF `FlavaLayer`).
#[derive(Module, Debug)]
pub struct Layer {
    /// Attention block.
    pub attention: Attention,
    /// First feed-forward projection (`intermediate.dense`).
    pub intermediate: Dense,
    /// Second feed-forward projection (`output.dense`).
    pub output: Dense,
    /// LayerNorm before attention.
    pub layernorm_before: LayerNorm,
    /// LayerNorm before the feed-forward block.
    pub layernorm_after: LayerNorm,
    /// Feed-forward activation.
    #[module(skip)]
    pub act: HiddenAct,
}

impl Layer {
    /// Builds a randomly initialised layer (HF initialisation).
    pub fn new(cfg: &EncoderConfig, device: &Device) -> Self {
        let (d, f, std) = (cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range);
        Self {
            attention: Attention {
                attention: SelfAttention {
                    query: linear(d, d, cfg.qkv_bias, std, device),
                    key: linear(d, d, cfg.qkv_bias, std, device),
                    value: linear(d, d, cfg.qkv_bias, std, device),
                    num_heads: cfg.num_attention_heads,
                },
                output: Dense::new(d, d, std, device),
            },
            intermediate: Dense::new(d, f, std, device),
            output: Dense::new(f, d, std, device),
            layernorm_before: layer_norm(d, cfg.layer_norm_eps, device),
            layernorm_after: layer_norm(d, cfg.layer_norm_eps, device),
            act: cfg.hidden_act,
        }
    }

    /// [batch, seq, hidden] → [batch, seq, hidden].
    pub fn forward(&self, x: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        let x = self
            .attention
            .forward_residual(self.layernorm_before.forward(x.clone()), x, key_mask);
        let y = linear_rows(&self.intermediate.dense, self.layernorm_after.forward(x.clone()));
        linear_rows_residual(&self.output.dense, self.act.apply(y), x)
    }
}

/// A stack of pre-LN layers (HF `FlavaEncoder`); no final LayerNorm (the towers own it).
#[derive(Module, Debug)]
pub struct Encoder {
    /// The layers, in order.
    pub layer: Vec<Layer>,
}

impl Encoder {
    /// Builds `cfg.num_hidden_layers` randomly initialised layers.
    ///
    /// # Panics
    /// If `hidden_size` is not divisible by `num_attention_heads` (configs are validated first).
    pub fn new(cfg: &EncoderConfig, device: &Device) -> Self {
        assert!(
            cfg.num_attention_heads > 0 && cfg.hidden_size.is_multiple_of(cfg.num_attention_heads),
            "hidden_size {} is not divisible by num_attention_heads {}",
            cfg.hidden_size,
            cfg.num_attention_heads
        );
        Self {
            layer: (0..cfg.num_hidden_layers).map(|_| Layer::new(cfg, device)).collect(),
        }
    }

    /// Runs all layers on [batch, seq, hidden]. Returns the last layer's output and, when
    /// `all_hidden` is set, HF's `hidden_states` tuple: the input followed by every layer's output.
    pub fn forward(
        &self,
        mut x: Tensor<3>,
        key_mask: Option<&Tensor<2, Bool>>,
        all_hidden: bool,
    ) -> (Tensor<3>, Option<Vec<Tensor<3>>>) {
        let mut hidden = all_hidden.then(|| vec![x.clone()]);
        for layer in &self.layer {
            x = layer.forward(x, key_mask);
            if let Some(h) = hidden.as_mut() {
                h.push(x.clone());
            }
        }
        (x, hidden)
    }
}

/// `tanh(dense(x[:, 0]))` (HF `FlavaPooler`).
#[derive(Module, Debug)]
pub struct Pooler {
    /// The projection.
    pub dense: Linear,
}

impl Pooler {
    /// Builds a `hidden → hidden` pooler.
    pub fn new(d: usize, std: f64, device: &Device) -> Self {
        Self {
            dense: linear(d, d, true, std, device),
        }
    }

    /// [batch, seq, hidden] → [batch, hidden].
    pub fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = x.dims();
        let cls = x.slice(s![.., 0..1, ..]).reshape([b, d]);
        tanh(linear_2d(&self.dense, cls))
    }
}

/// What a tower returns.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Final hidden states after the tower's final LayerNorm: [batch, seq, hidden].
    pub last_hidden_state: Tensor<3>,
    /// The last layer's output before the final LayerNorm (the fusion input; HF
    /// `hidden_states[-1]`): [batch, seq, hidden].
    pub pre_layernorm: Tensor<3>,
    /// `tanh(dense(last_hidden_state[:, 0]))`: [batch, hidden].
    pub pooler_output: Tensor<2>,
    /// Embedding output and every layer's output (N+1 entries), when requested.
    pub hidden_states: Option<Vec<Tensor<3>>>,
}

/// Converts an HF attention mask (1 = attend, 0 = padding), [batch, seq], to Burn's key-padding
/// convention (`true` = masked).
pub fn padding_mask(attention_mask: &Tensor<2, Int>) -> Tensor<2, Bool> {
    attention_mask.clone().equal_elem(0)
}
