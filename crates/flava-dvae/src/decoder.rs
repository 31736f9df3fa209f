//! The dVAE decoder (DALL-E `dall_e/decoder.py`, absent from HF and torchmultimodal).
//!
//! `input` 1×1 conv from the vocabulary to `n_init` channels → four groups of residual blocks
//! (res path ReLU-conv1-ReLU-conv3-ReLU-conv3-ReLU-conv3, post-gain `1 / n_layers²`) with 2×
//! nearest upsampling after groups 1–3, widths 8h, 4h, 2h, h → ReLU + 1×1 conv to the output
//! channels. Input: (soft) one-hot codes [B, vocab, h, w]; output [B, out, 8h, 8w].

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use serde::{Deserialize, Serialize};

use crate::encoder::conv;

/// Decoder shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecoderConfig {
    /// Visual vocabulary.
    pub vocab_size: usize,
    /// Channels after the input conv (DALL-E: 128).
    pub n_init: usize,
    /// Base width h (DALL-E: 256).
    pub hidden_size: usize,
    /// Residual blocks per group.
    pub num_blocks_per_group: usize,
    /// Output channels (3 for an L2 reconstruction, 6 for logit-Laplace).
    pub output_channels: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            n_init: 128,
            hidden_size: 256,
            num_blocks_per_group: 2,
            output_channels: 6,
        }
    }
}

/// Residual path convs.
#[derive(Module, Debug)]
pub struct DecoderResPath {
    /// 1×1.
    pub conv_1: Conv2d,
    /// 3×3.
    pub conv_2: Conv2d,
    /// 3×3.
    pub conv_3: Conv2d,
    /// 3×3.
    pub conv_4: Conv2d,
}

/// One decoder block.
#[derive(Module, Debug)]
pub struct DecoderBlock {
    /// 1×1 conv when the width changes.
    pub id_path: Option<Conv2d>,
    /// Residual path.
    pub res_path: DecoderResPath,
    /// `1 / n_layers²`.
    pub post_gain: f64,
}

impl DecoderBlock {
    fn new(c_in: usize, c_out: usize, n_layers: usize, device: &Device) -> Self {
        let hid = c_out / 4;
        Self {
            id_path: (c_in != c_out).then(|| conv(c_in, c_out, 1, device)),
            res_path: DecoderResPath {
                conv_1: conv(c_in, hid, 1, device),
                conv_2: conv(hid, hid, 3, device),
                conv_3: conv(hid, hid, 3, device),
                conv_4: conv(hid, c_out, 3, device),
            },
            post_gain: 1.0 / (n_layers * n_layers) as f64,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let p = &self.res_path;
        let r = p.conv_4.forward(relu(
            p.conv_3
                .forward(relu(p.conv_2.forward(relu(p.conv_1.forward(relu(x.clone())))))),
        ));
        let id = match &self.id_path {
            Some(c) => c.forward(x),
            None => x,
        };
        id + r * self.post_gain
    }
}

/// A group of decoder blocks, optionally followed by 2× nearest upsampling.
#[derive(Module, Debug)]
pub struct DecoderGroup {
    /// Blocks.
    pub blocks: Vec<DecoderBlock>,
    /// Upsample after the blocks.
    pub upsample: bool,
}

/// The dVAE decoder.
#[derive(Module, Debug)]
pub struct Decoder {
    /// 1×1 conv from the vocabulary.
    pub input: Conv2d,
    /// The four groups.
    pub groups: Vec<DecoderGroup>,
    /// ReLU + 1×1 conv to the output channels.
    pub output: Conv2d,
}

impl Decoder {
    /// A randomly initialised decoder.
    pub fn new(cfg: &DecoderConfig, device: &Device) -> Self {
        let h = cfg.hidden_size;
        let n_layers = 4 * cfg.num_blocks_per_group;
        let widths = [
            (cfg.n_init, 8 * h, true),
            (8 * h, 4 * h, true),
            (4 * h, 2 * h, true),
            (2 * h, h, false),
        ];
        Self {
            input: conv(cfg.vocab_size, cfg.n_init, 1, device),
            groups: widths
                .iter()
                .map(|&(c_in, c_out, up)| DecoderGroup {
                    blocks: (0..cfg.num_blocks_per_group)
                        .map(|i| DecoderBlock::new(if i == 0 { c_in } else { c_out }, c_out, n_layers, device))
                        .collect(),
                    upsample: up,
                })
                .collect(),
            output: conv(h, cfg.output_channels, 1, device),
        }
    }

    /// [B, vocab, h, w] codes → [B, out, 8h, 8w].
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.input.forward(z);
        for g in &self.groups {
            for b in &g.blocks {
                x = b.forward(x);
            }
            if g.upsample {
                let [_, _, h, w] = x.dims();
                x = interpolate(
                    x,
                    InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
                );
            }
        }
        self.output.forward(relu(x))
    }
}
