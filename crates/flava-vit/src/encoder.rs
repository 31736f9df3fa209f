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
        linear_rows(&self.output.dense, self.context(x, key_mask, None))
    }

    /// `residual + forward(x)`, the residual added by the output projection's kernel.
    pub fn forward_residual(&self, x: Tensor<3>, residual: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>) -> Tensor<3> {
        linear_rows_residual(&self.output.dense, self.context(x, key_mask, None), residual)
    }

    /// [`Self::forward_residual`] at some positions only: every row of `x` [batch, seq, hidden]
    /// gives keys and values, the rows `at` picks the queries; `residual` is [batch, m, hidden]
    /// (the same rows of the layer's input), and so is the result.
    pub fn forward_at_residual(
        &self,
        x: Tensor<3>,
        residual: Tensor<3>,
        key_mask: Option<&Tensor<2, Bool>>,
        at: &Positions,
    ) -> Tensor<3> {
        linear_rows_residual(&self.output.dense, self.context(x, key_mask, Some(at)), residual)
    }

    /// The heads' context before the output projection: [batch, seq, hidden], or [batch, m,
    /// hidden] for the queries of the rows `at` picks (over all keys).
    fn context(&self, x: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>, at: Option<&Positions>) -> Tensor<3> {
        let queries = match at {
            Some(at) => at.select(x.clone()),
            None => x.clone(),
        };
        let q = linear_rows(&self.attention.query, queries);
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

    /// The layer's output at the rows `at` picks: [batch, seq, hidden] → [batch, m, hidden],
    /// equal to `forward(x)` at those rows. Keys and values still come from every position; the
    /// query, the output projection and the feed-forward block run on the m rows alone (at the
    /// CLS row only, about a sixth of the layer's products at 197 positions).
    pub fn forward_at(&self, x: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>, at: &Positions) -> Tensor<3> {
        let residual = at.select(x.clone());
        let x = self
            .attention
            .forward_at_residual(self.layernorm_before.forward(x), residual, key_mask, at);
        let y = linear_rows(&self.intermediate.dense, self.layernorm_after.forward(x.clone()));
        linear_rows_residual(&self.output.dense, self.act.apply(y), x)
    }
}

impl Layer {
    /// One pass over two groups stacked along the batch: every row of the first `n` samples
    /// ([n, seq, hidden]) and the first row alone of the others ([batch − n, 1, hidden]), equal
    /// to `forward(x)` at those rows. Keys, values and every product run once over both groups;
    /// only attention runs per group. (A paired step's towers: the masked inputs feed the fusion
    /// with every row, the unmasked ones only the contrastive loss with their CLS.)
    ///
    /// # Panics
    /// Unless `0 < n < batch`.
    pub fn forward_split(&self, x: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>, n: usize) -> (Tensor<3>, Tensor<3>) {
        let [bt, s, d] = x.dims();
        assert!(0 < n && n < bt, "a split of {bt} samples after {n}");
        // Every row of the first n samples, then row 0 of each other one: [1, n·s + bt − n, d].
        let rows = |t: Tensor<3>| {
            let all = t.clone().slice(s![0..n]).reshape([1, n * s, d]);
            let first = t.slice(s![n..bt, 0..1, ..]).reshape([1, bt - n, d]);
            Tensor::cat(vec![all, first], 1)
        };
        let split = |t: Tensor<3>| {
            let all = t.clone().slice(s![.., 0..n * s, ..]).reshape([n, s, d]);
            (all, t.slice(s![.., n * s.., ..]).reshape([bt - n, 1, d]))
        };
        let ln = self.layernorm_before.forward(x.clone());
        let sa = &self.attention.attention;
        let (k, v) = (linear_rows(&sa.key, ln.clone()), linear_rows(&sa.value, ln.clone()));
        let (qa, qb) = split(linear_rows(&sa.query, rows(ln)));
        let group = |t: &Tensor<3>, r: std::ops::Range<usize>| t.clone().slice(s![r]);
        let mask = |r: std::ops::Range<usize>| key_mask.map(|m| m.clone().slice(s![r]));
        let attend = |q: Tensor<3>, r: std::ops::Range<usize>| {
            let m = mask(r.clone());
            crate::kernels::multi_head_attention(q, group(&k, r.clone()), group(&v, r), sa.num_heads, m.as_ref())
        };
        let (ca, cb) = (attend(qa, 0..n), attend(qb, n..bt));
        let ctx = Tensor::cat(vec![ca.reshape([1, n * s, d]), cb.reshape([1, bt - n, d])], 1);
        let h = linear_rows_residual(&self.attention.output.dense, ctx, rows(x));
        let y = linear_rows(&self.intermediate.dense, self.layernorm_after.forward(h.clone()));
        split(linear_rows_residual(&self.output.dense, self.act.apply(y), h))
    }
}

/// Which rows of each sample a last layer computes (the rest of its output would be read by
/// nobody): the first (the CLS token), or a list per sample.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one value per pass: a box would buy nothing
pub enum Positions {
    /// Row 0 of every sample: [batch, 1, hidden].
    First,
    /// `[batch, m]` row indices per sample (every index below the sequence length; a sample
    /// with fewer rows repeats one): [batch, m, hidden], row `j` of sample `i` the state at
    /// `index[i, j]`.
    Rows(Tensor<2, Int>),
}

impl Positions {
    /// Those rows of `x` [batch, seq, hidden] → [batch, m, hidden].
    pub fn select(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Positions::First => x.slice(s![.., 0..1, ..]),
            Positions::Rows(index) => {
                let [b, m] = index.dims();
                let d = x.dims()[2];
                x.gather(1, index.clone().reshape([b, m, 1]).expand([b, m, d]))
            }
        }
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

    /// The last layer's output at the rows `at` picks, [batch, m, hidden]: equal to
    /// `forward(x, key_mask, false).0` at those rows, with the last layer run by
    /// [`Layer::forward_at`]. For readers of a few rows: the CLS token of contrastive features,
    /// classification heads and linear probes; the masked positions of the pretraining losses.
    pub fn forward_at(&self, mut x: Tensor<3>, key_mask: Option<&Tensor<2, Bool>>, at: &Positions) -> Tensor<3> {
        let Some((last, rest)) = self.layer.split_last() else {
            return at.select(x);
        };
        for layer in rest {
            x = layer.forward(x, key_mask);
        }
        last.forward_at(x, key_mask, at)
    }
}

impl Encoder {
    /// All layers over `x` [batch, seq, hidden], the last one by [`Layer::forward_split`]: the
    /// last states of the first `n` samples, [n, seq, hidden], and of the first row of the
    /// others, [batch − n, 1, hidden].
    ///
    /// # Panics
    /// Unless `0 < n < batch`.
    pub fn forward_split(
        &self,
        mut x: Tensor<3>,
        key_mask: Option<&Tensor<2, Bool>>,
        n: usize,
    ) -> (Tensor<3>, Tensor<3>) {
        let bt = x.dims()[0];
        assert!(0 < n && n < bt, "a split of {bt} samples after {n}");
        let Some((last, rest)) = self.layer.split_last() else {
            return (x.clone().slice(s![0..n]), x.slice(s![n..bt, 0..1, ..]));
        };
        for layer in rest {
            x = layer.forward(x, key_mask);
        }
        last.forward_split(x, key_mask, n)
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

impl EncoderOutput {
    /// A tower's output from its encoder's last states `pre_layernorm` [batch, seq, hidden]: the
    /// tower's final LayerNorm, its pooler on the first row, and `hidden_states` as given.
    pub fn finish(
        pre_layernorm: Tensor<3>,
        layernorm: &LayerNorm,
        pooler: &Pooler,
        hidden_states: Option<Vec<Tensor<3>>>,
    ) -> Self {
        let last_hidden_state = layernorm.forward(pre_layernorm.clone());
        Self {
            pooler_output: pooler.forward(last_hidden_state.clone()),
            last_hidden_state,
            pre_layernorm,
            hidden_states,
        }
    }
}

/// Converts an HF attention mask (1 = attend, 0 = padding), [batch, seq], to Burn's key-padding
/// convention (`true` = masked).
pub fn padding_mask(attention_mask: &Tensor<2, Int>) -> Tensor<2, Bool> {
    attention_mask.clone().equal_elem(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// `Encoder::forward_at` against the full pass at the same rows, on flex with autodiff: the
    /// output and the gradients of the input and of every parameter of the first and the last
    /// layer, with padded keys (sample 1 pads its last 5 of 19 positions), 3 layers of width 32
    /// and 4 heads; at the first row, and at 4 rows per sample given out of order, repeated, and
    /// on a padded key. Within 1e-5 relative to each tensor's largest magnitude (the products run
    /// on fewer rows, the gemm may order sums differently).
    /// And `Encoder::forward_split` (one sample whole, two at their first row, padded keys in
    /// the second group) against the full pass, the same way.
    #[test]
    fn a_last_layer_at_some_rows_equals_the_full_pass_at_those_rows() {
        let device = Device::flex().autodiff();
        let cfg = EncoderConfig {
            hidden_size: 32,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            intermediate_size: 64,
            layer_norm_eps: 1e-12,
            qkv_bias: true,
            hidden_act: HiddenAct::Gelu,
            initializer_range: 0.2,
        };
        let encoder = Encoder::new(&cfg, &device);
        let (b, s) = (2, 19);
        let pad: Vec<bool> = (0..b * s).map(|i| i / s == 1 && i % s >= 14).collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, s]), &device);
        let x0 = Tensor::<3>::random([b, s, 32], Distribution::Normal(0.0, 1.0), &device);
        let rows = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 5, 13, 5, 18, 2, 16, 0], [2, 4]), &device);
        for at in [Positions::First, Positions::Rows(rows)] {
            let m = at.select(x0.clone()).dims()[1];
            let w = Tensor::<3>::random([b, m, 32], Distribution::Normal(0.0, 1.0), &device);
            let run = |selected: bool| {
                let x = x0.clone().require_grad();
                let out = if selected {
                    encoder.forward_at(x.clone(), Some(&mask), &at)
                } else {
                    at.select(encoder.forward(x.clone(), Some(&mask), false).0)
                };
                assert_eq!(out.dims(), [b, m, 32]);
                let grads = (out.clone() * w.clone()).sum().backward();
                let flat = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().expect("f32");
                let (first, last) = (&encoder.layer[0], &encoder.layer[2]);
                vec![
                    ("output", flat(out.reshape([b * m, 32]))),
                    ("dx", flat(x.grad(&grads).expect("dx").reshape([b * s, 32]))),
                    (
                        "first query",
                        flat(first.attention.attention.query.weight.grad(&grads).expect("dq")),
                    ),
                    (
                        "last query",
                        flat(last.attention.attention.query.weight.grad(&grads).expect("dq")),
                    ),
                    (
                        "last key",
                        flat(last.attention.attention.key.weight.grad(&grads).expect("dk")),
                    ),
                    (
                        "last value",
                        flat(last.attention.attention.value.weight.grad(&grads).expect("dv")),
                    ),
                    (
                        "last output",
                        flat(last.output.dense.weight.grad(&grads).expect("dout")),
                    ),
                    (
                        "last intermediate",
                        flat(last.intermediate.dense.weight.grad(&grads).expect("dint")),
                    ),
                ]
            };
            let (got, want) = (run(true), run(false));
            for ((name, g), (_, r)) in got.iter().zip(&want) {
                let top = r.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert!(top > 1e-3, "{name} is not trivially zero");
                for (a, e) in g.iter().zip(r) {
                    assert!((a - e).abs() <= 1e-5 * top, "{at:?} {name}: {a} vs {e}");
                }
            }
        }
        // Split after sample 1 of a 3-sample batch: sample 0 whole, samples 1 and 2 at row 0.
        let x3 = Tensor::<3>::random([3, s, 32], Distribution::Normal(0.0, 1.0), &device);
        let mask3 = Tensor::<2, Bool>::from_data(
            TensorData::new(
                (0..3 * s).map(|i| i / s == 2 && i % s >= 11).collect::<Vec<_>>(),
                [3, s],
            ),
            &device,
        );
        let (wa, wb) = (
            Tensor::<3>::random([1, s, 32], Distribution::Normal(0.0, 1.0), &device),
            Tensor::<3>::random([2, 1, 32], Distribution::Normal(0.0, 1.0), &device),
        );
        let run = |split: bool| {
            let x = x3.clone().require_grad();
            let (a, b) = if split {
                encoder.forward_split(x.clone(), Some(&mask3), 1)
            } else {
                let full = encoder.forward(x.clone(), Some(&mask3), false).0;
                (full.clone().slice(s![0..1]), full.slice(s![1..3, 0..1, ..]))
            };
            assert_eq!((a.dims(), b.dims()), ([1, s, 32], [2, 1, 32]));
            let grads = ((a.clone() * wa.clone()).sum() + (b.clone() * wb.clone()).sum()).backward();
            let flat = |t: Tensor<3>| t.reshape([-1]).into_data().try_into_vec::<f32>().expect("f32");
            let last = &encoder.layer[2];
            let g2 = |t: Tensor<2>| t.reshape([-1]).into_data().try_into_vec::<f32>().expect("f32");
            vec![
                ("whole sample", flat(a)),
                ("first rows", flat(b)),
                ("dx", flat(x.grad(&grads).expect("dx"))),
                (
                    "last query",
                    g2(last.attention.attention.query.weight.grad(&grads).expect("dq")),
                ),
                (
                    "last key",
                    g2(last.attention.attention.key.weight.grad(&grads).expect("dk")),
                ),
                ("last output", g2(last.output.dense.weight.grad(&grads).expect("dout"))),
            ]
        };
        let (got, want) = (run(true), run(false));
        for ((name, g), (_, r)) in got.iter().zip(&want) {
            let top = r.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(top > 1e-3, "split: {name} is not trivially zero");
            for (a, e) in g.iter().zip(r) {
                assert!((a - e).abs() <= 1e-5 * top, "split: {name}: {a} vs {e}");
            }
        }
        // No layers: the rows as they came in.
        let no_layers = Encoder { layer: vec![] };
        let cls = no_layers.forward_at(x0.clone(), None, &Positions::First);
        let want = x0.slice(s![.., 0..1, ..]);
        assert_eq!(cls.into_data(), want.into_data());
    }
}
