//! The dVAE encoder: DALL-E's encoder as HF `FlavaImageCodebook`.
//!
//! `input` 7×7 conv → four groups of residual blocks (id path a 1×1 conv when widths differ; res
//! path ReLU-conv3-ReLU-conv3-ReLU-conv3-ReLU-conv1 scaled by `1 / n_layers²`), 2×2 max-pool after
//! groups 1–3 → ReLU + 1×1 conv to the vocabulary. Input: [B, 3, H, W] in `0.8·x + 0.1` space;
//! output logits [B, vocab, H/8, W/8]. Module paths mirror the HF keys, except that the blocks of
//! a group are a `Vec` (`group.{i}` here, `group.block_{i+1}` in the checkpoint).

use burn::module::{Initializer, Module};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::activation::{relu, softmax};
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;

use crate::config::FlavaImageCodebookConfig;

/// A conv initialised as DALL-E does: N(0, 1/√(c_in·k²)), bias 0.
pub fn conv(c_in: usize, c_out: usize, k: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_padding(PaddingConfig2d::Explicit(
            (k - 1) / 2,
            (k - 1) / 2,
            (k - 1) / 2,
            (k - 1) / 2,
        ))
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: 1.0 / ((c_in * k * k) as f64).sqrt(),
        })
        .init(device)
}

/// The four convs of a residual path (`res_path.path`).
#[derive(Module, Debug)]
pub struct ResPathConvs {
    /// First conv.
    pub conv_1: Conv2d,
    /// Second conv.
    pub conv_2: Conv2d,
    /// Third conv.
    pub conv_3: Conv2d,
    /// Fourth conv.
    pub conv_4: Conv2d,
}

/// `res_path` of a block.
#[derive(Module, Debug)]
pub struct ResPath {
    /// The convs.
    pub path: ResPathConvs,
}

/// One encoder block.
#[derive(Module, Debug)]
pub struct EncoderBlock {
    /// 1×1 conv when the width changes.
    pub id_path: Option<Conv2d>,
    /// The residual path.
    pub res_path: ResPath,
    /// `1 / n_layers²`.
    pub post_gain: f64,
}

impl EncoderBlock {
    /// A block `c_in → c_out` (hidden width `c_out / 4`; kernels 3, 3, 3, 1).
    pub fn new(c_in: usize, c_out: usize, n_layers: usize, device: &Device) -> Self {
        let hid = c_out / 4;
        Self {
            id_path: (c_in != c_out).then(|| conv(c_in, c_out, 1, device)),
            res_path: ResPath {
                path: ResPathConvs {
                    conv_1: conv(c_in, hid, 3, device),
                    conv_2: conv(hid, hid, 3, device),
                    conv_3: conv(hid, hid, 3, device),
                    conv_4: conv(hid, c_out, 1, device),
                },
            },
            post_gain: 1.0 / (n_layers * n_layers) as f64,
        }
    }

    /// [B, c_in, H, W] → [B, c_out, H, W].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let p = &self.res_path.path;
        let r = p.conv_1.forward(relu(x.clone()));
        let r = p.conv_2.forward(relu(r));
        let r = p.conv_3.forward(relu(r));
        let r = p.conv_4.forward(relu(r));
        let id = match &self.id_path {
            Some(c) => c.forward(x),
            None => x,
        };
        id + r * self.post_gain
    }
}

/// A group of blocks (`group_k.group.block_i`).
#[derive(Module, Debug)]
pub struct EncoderGroup {
    /// The blocks.
    pub group: Vec<EncoderBlock>,
    /// Whether a 2×2 max-pool follows.
    pub pool: bool,
}

impl EncoderGroup {
    /// [B, c_in, H, W] → [B, c_out, H/2, W/2] (or H, W without pool).
    pub fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for b in &self.group {
            x = b.forward(x);
        }
        if self.pool {
            x = max_pool2d(x, MaxPoolOptions::new([2, 2]));
        }
        x
    }
}

/// The output head (`blocks.output.conv`).
#[derive(Module, Debug)]
pub struct OutputConv {
    /// 1×1 conv to the vocabulary.
    pub conv: Conv2d,
}

/// `blocks` of the codebook.
#[derive(Module, Debug)]
pub struct EncoderBlocks {
    /// 7×7 input conv.
    pub input: Conv2d,
    /// Width h.
    pub group_1: EncoderGroup,
    /// Width 2h.
    pub group_2: EncoderGroup,
    /// Width 4h.
    pub group_3: EncoderGroup,
    /// Width 8h.
    pub group_4: EncoderGroup,
    /// ReLU + 1×1 conv.
    pub output: OutputConv,
}

/// The dVAE encoder / FLAVA image codebook.
#[derive(Module, Debug)]
pub struct ImageCodebook {
    /// All layers.
    pub blocks: EncoderBlocks,
}

impl ImageCodebook {
    /// A randomly initialised codebook (DALL-E initialisation).
    pub fn new(cfg: &FlavaImageCodebookConfig, device: &Device) -> Self {
        let h = cfg.hidden_size;
        let n_layers = cfg.num_groups * cfg.num_blocks_per_group;
        let group = |c_in: usize, c_out: usize, pool: bool| EncoderGroup {
            group: (0..cfg.num_blocks_per_group)
                .map(|i| EncoderBlock::new(if i == 0 { c_in } else { c_out }, c_out, n_layers, device))
                .collect(),
            pool,
        };
        Self {
            blocks: EncoderBlocks {
                input: conv(cfg.input_channels, h, 7, device),
                group_1: group(h, h, true),
                group_2: group(h, 2 * h, true),
                group_3: group(2 * h, 4 * h, true),
                group_4: group(4 * h, 8 * h, false),
                output: OutputConv {
                    conv: conv(8 * h, cfg.vocab_size, 1, device),
                },
            },
        }
    }

    /// Logits: [B, 3, H, W] (pixels in `0.8·x + 0.1` space) → [B, vocab, H/8, W/8].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let b = &self.blocks;
        let x = b.input.forward(x);
        let x = b
            .group_4
            .forward(b.group_3.forward(b.group_2.forward(b.group_1.forward(x))));
        b.output.conv.forward(relu(x))
    }

    /// Visual tokens, row-major: [B, 3, H, W] → [B, (H/8)·(W/8)] (argmax over the vocabulary).
    pub fn tokens(&self, x: Tensor<4>) -> Tensor<2, Int> {
        let logits = self.forward_frozen(x);
        let [b, _, h, w] = logits.dims();
        logits.argmax(1).reshape([b, h * w])
    }

    /// [`ImageCodebook::forward`] for a frozen codebook (no gradients): on flex devices by
    /// im2col + matmul convs (`frozen.rs`), elsewhere Burn's convs on the detached input.
    pub fn forward_frozen(&self, x: Tensor<4>) -> Tensor<4> {
        if crate::frozen::on_flex_f32(&x) {
            crate::frozen::forward(self, x)
        } else {
            self.forward(x.detach()).detach()
        }
    }

    /// Token probabilities: softmax over the vocabulary, [B, vocab, H/8, W/8].
    pub fn probs(&self, x: Tensor<4>) -> Tensor<4> {
        softmax(self.forward(x), 1)
    }
}
