//! The ViT image encoder (HF `FlavaImageModel`): patch embedding, CLS token, position embeddings
//! (bicubic interpolation for other resolutions), mask-token blending, the pre-LN encoder, final
//! LayerNorm and tanh pooler.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::config::FlavaImageConfig;
use crate::encoder::{layer_norm, Encoder, EncoderOutput, Pooler, Positions};
use crate::norm::LayerNorm;

/// Conv patch embedding, kernel = stride = patch size (HF `PatchEmbeddings.projection`).
#[derive(Module, Debug)]
pub struct PatchEmbeddings {
    /// `Conv2d(channels → hidden, kernel p, stride p)`; weight [hidden, channels, p, p].
    pub projection: Conv2d,
}

impl PatchEmbeddings {
    /// `pixel_values` [batch, channels, H, W] → [batch, (H/p)·(W/p), hidden], the patches in
    /// row-major order (the conv's output, flattened and transposed as HF does).
    ///
    /// On flex, when the patches tile the image, the conv is one matmul of the patches' pixels
    /// [batch·patches, channels·p·p] by the flattened kernel (the linear kernel, forward and
    /// backward): Burn's conv and its weight gradient took several times as long, plus a transpose.
    pub fn forward(&self, pixel_values: Tensor<4>, patch_size: usize) -> Tensor<3> {
        let [b, c, h, w] = pixel_values.dims();
        let p = patch_size;
        let [d, wc, kh, kw] = self.projection.weight.dims();
        let tiles = p > 0 && h % p == 0 && w % p == 0 && [wc, kh, kw] == [c, p, p];
        let plain =
            self.projection.stride == [p, p] && self.projection.dilation == [1, 1] && self.projection.groups == 1;
        if tiles && plain && crate::kernels::on_flex_f32(&pixel_values) && !self.padded() {
            let (gh, gw) = (h / p, w / p);
            let patches = pixel_values
                .reshape([b, c, gh, p, gw, p])
                .permute([0, 2, 4, 1, 3, 5])
                .reshape([b * gh * gw, c * p * p]);
            let weight = self.projection.weight.val().reshape([d, c * p * p]).transpose();
            let bias = self.projection.bias.as_ref().map(|b| b.val());
            return crate::kernels::linear(patches, weight, bias).reshape([b, gh * gw, d]);
        }
        let x = self.projection.forward(pixel_values);
        let [_, d, gh, gw] = x.dims();
        x.reshape([b, d, gh * gw]).swap_dims(1, 2)
    }

    fn padded(&self) -> bool {
        !matches!(self.projection.padding, burn::nn::PaddingConfig2d::Valid)
    }
}

/// CLS token, optional mask token, position embeddings and the patch embedding.
#[derive(Module, Debug)]
pub struct ImageEmbeddings {
    /// [1, 1, hidden]
    pub cls_token: Param<Tensor<3>>,
    /// [1, 1, hidden]; present when `mask_token = true` in the config.
    pub mask_token: Option<Param<Tensor<3>>>,
    /// [1, 1 + num_patches, hidden]; index 0 is the CLS position.
    pub position_embeddings: Param<Tensor<3>>,
    /// The patch projection.
    pub patch_embeddings: PatchEmbeddings,
    /// Patch size in pixels.
    pub patch_size: usize,
}

/// A parameter drawn from N(0, std).
pub fn normal_param(shape: [usize; 3], std: f64, device: &Device) -> Param<Tensor<3>> {
    Param::from_tensor(Tensor::random(
        shape,
        burn::tensor::Distribution::Normal(0.0, std),
        device,
    ))
}

impl ImageEmbeddings {
    /// Builds the embeddings. HF starts the CLS/mask tokens and position embeddings at zero; we
    /// draw them from N(0, initializer_range) as timm's ViT does: a zero CLS vector meets the
    /// first LayerNorm (eps 1e-12) with zero variance, which makes its first gradients ~1e6 times
    /// too large and stalls contrastive training from scratch (measured: the contrastive loss
    /// stays at ln(batch) for hundreds of steps). Loaded checkpoints are unaffected.
    pub fn new(cfg: &FlavaImageConfig, device: &Device) -> Self {
        let d = cfg.hidden_size;
        let projection = Conv2dConfig::new([cfg.num_channels, d], [cfg.patch_size, cfg.patch_size])
            .with_stride([cfg.patch_size, cfg.patch_size])
            .with_initializer(burn::module::Initializer::Normal {
                mean: 0.0,
                std: cfg.initializer_range,
            })
            .init(device);
        Self {
            cls_token: normal_param([1, 1, d], cfg.initializer_range, device),
            mask_token: cfg
                .mask_token
                .then(|| normal_param([1, 1, d], cfg.initializer_range, device)),
            position_embeddings: normal_param([1, cfg.num_patches() + 1, d], cfg.initializer_range, device),
            patch_embeddings: PatchEmbeddings { projection },
            patch_size: cfg.patch_size,
        }
    }

    /// Position embeddings for a `height × width` input: the stored ones when the patch grid
    /// matches, otherwise the patch part resized with bicubic interpolation (align_corners =
    /// false, HF's ViT-style `interpolate_pos_encoding`). Returns [1, 1 + h·w, hidden].
    pub fn interpolated_position_embeddings(&self, height: usize, width: usize) -> Tensor<3> {
        let pos = self.position_embeddings.val();
        let [_, n, d] = pos.dims();
        let num_positions = n - 1;
        let (gh, gw) = (height / self.patch_size, width / self.patch_size);
        if gh * gw == num_positions && height == width {
            return pos;
        }
        let side = (num_positions as f64).sqrt().round() as usize;
        let cls = pos.clone().slice(s![.., 0..1, ..]);
        let grid = pos
            .slice(s![.., 1.., ..])
            .reshape([1, side, side, d])
            .permute([0, 3, 1, 2]);
        let resized = interpolate(
            grid,
            InterpolateOptions::new(InterpolateMode::Bicubic)
                .with_align_corners(false)
                .with_output_size([gh, gw]),
        );
        let patches = resized.permute([0, 2, 3, 1]).reshape([1, gh * gw, d]);
        Tensor::cat(vec![cls, patches], 1)
    }

    /// `pixel_values`: [batch, channels, H, W]; `bool_masked_pos`: [batch, num_patches] (row-major
    /// patch index, `true` = replace the patch by the mask token). Returns [batch, 1 + patches, hidden].
    pub fn forward(
        &self,
        pixel_values: Tensor<4>,
        bool_masked_pos: Option<&Tensor<2, Bool>>,
        interpolate_pos_encoding: bool,
    ) -> Tensor<3> {
        let [b, _, h, w] = pixel_values.dims();
        let mut x = self.patch_embeddings.forward(pixel_values, self.patch_size);
        let [_, patches, d] = x.dims();
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        debug_assert_eq!(patches, gh * gw);
        if let (Some(m), Some(token)) = (bool_masked_pos, self.mask_token.as_ref()) {
            // HF blends in float: emb·(1−m) + token·m.
            let m = m.clone().float().reshape([b, gh * gw, 1]);
            let token = token.val().expand([b, gh * gw, d]);
            x = x * (m.clone().neg() + 1.0) + token * m;
        }
        let cls = self.cls_token.val().expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1);
        let pos = if interpolate_pos_encoding {
            self.interpolated_position_embeddings(h, w)
        } else {
            self.position_embeddings.val()
        };
        x + pos
    }
}

/// The FLAVA image tower (HF `FlavaImageModel`).
#[derive(Module, Debug)]
pub struct ImageModel {
    /// Patch, CLS, mask and position embeddings.
    pub embeddings: ImageEmbeddings,
    /// Pre-LN transformer layers.
    pub encoder: Encoder,
    /// Final LayerNorm.
    pub layernorm: LayerNorm,
    /// Tanh pooler on the CLS token.
    pub pooler: Pooler,
}

impl ImageModel {
    /// Builds a randomly initialised image tower (HF initialisation).
    pub fn new(cfg: &FlavaImageConfig, device: &Device) -> Self {
        Self {
            embeddings: ImageEmbeddings::new(cfg, device),
            encoder: Encoder::new(&cfg.encoder(), device),
            layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, device),
            pooler: Pooler::new(cfg.hidden_size, cfg.initializer_range, device),
        }
    }

    /// Encodes images.
    ///
    /// `pixel_values`: [batch, channels, H, W] normalised pixels; `bool_masked_pos`: optional
    /// [batch, num_patches] patch mask; `interpolate_pos_encoding`: resize position embeddings for
    /// another resolution; `all_hidden`: also return every layer's output.
    pub fn forward(
        &self,
        pixel_values: Tensor<4>,
        bool_masked_pos: Option<&Tensor<2, Bool>>,
        interpolate_pos_encoding: bool,
        all_hidden: bool,
    ) -> EncoderOutput {
        let x = self
            .embeddings
            .forward(pixel_values, bool_masked_pos, interpolate_pos_encoding);
        let (pre_layernorm, hidden_states) = self.encoder.forward(x, None, all_hidden);
        EncoderOutput::finish(pre_layernorm, &self.layernorm, &self.pooler, hidden_states)
    }

    /// `forward(pixel_values, bool_masked_pos, interpolate_pos_encoding, false)
    /// .last_hidden_state` at the rows `at` picks, [batch, m, hidden], with the last layer run at
    /// those rows only ([`Encoder::forward_at`]).
    pub fn forward_at(
        &self,
        pixel_values: Tensor<4>,
        bool_masked_pos: Option<&Tensor<2, Bool>>,
        interpolate_pos_encoding: bool,
        at: &Positions,
    ) -> Tensor<3> {
        let x = self
            .embeddings
            .forward(pixel_values, bool_masked_pos, interpolate_pos_encoding);
        self.layernorm.forward(self.encoder.forward_at(x, None, at))
    }

    /// One pass over a batch whose first `n` samples are read whole and the others only at
    /// their CLS ([`Encoder::forward_split`]): the first `n` samples' output as
    /// [`Self::forward`] gives it (no `hidden_states`), and the others' `last_hidden_state[:, 0]`,
    /// [batch − n, hidden].
    ///
    /// # Panics
    /// Unless `0 < n < batch`.
    pub fn forward_split(
        &self,
        pixel_values: Tensor<4>,
        bool_masked_pos: Option<&Tensor<2, Bool>>,
        n: usize,
    ) -> (EncoderOutput, Tensor<2>) {
        let x = self.embeddings.forward(pixel_values, bool_masked_pos, false);
        let (whole, first) = self.encoder.forward_split(x, None, n);
        let [m, _, d] = first.dims();
        let out = EncoderOutput::finish(whole, &self.layernorm, &self.pooler, None);
        (out, self.layernorm.forward(first).reshape([m, d]))
    }

    /// `forward(pixel_values, None, interpolate_pos_encoding, false).last_hidden_state[:, 0]`,
    /// [batch, hidden], with the last layer run at the CLS position only: what contrastive
    /// features and classification heads read.
    pub fn forward_cls(&self, pixel_values: Tensor<4>, interpolate_pos_encoding: bool) -> Tensor<2> {
        let x = self.forward_at(pixel_values, None, interpolate_pos_encoding, &Positions::First);
        let [b, _, d] = x.dims();
        x.reshape([b, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The patch embedding as one product (flex) against Burn's conv, forward and every gradient
    /// (pixels, weight, bias), on a 2-image batch of 3×24×16 pixels, patch 8; within 1e-5.
    #[test]
    fn patch_embedding_product_matches_the_conv() {
        let device = Device::flex().autodiff();
        let projection = Conv2dConfig::new([3, 6], [8, 8]).with_stride([8, 8]).init(&device);
        let patches = PatchEmbeddings { projection };
        let px = Tensor::<4>::random([2, 3, 24, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let ours = patches.forward(px.clone(), 8);
        let conv = patches.projection.forward(px.clone());
        let [b, d, gh, gw] = conv.dims();
        let reference = conv.reshape([b, d, gh * gw]).swap_dims(1, 2);
        assert_eq!(ours.dims(), [2, 6, 6]);
        let weights = Tensor::<3>::random([2, 6, 6], Distribution::Normal(0.0, 1.0), &device);
        let max = |a: Tensor<1>, b: Tensor<1>| (a - b).abs().max().into_scalar::<f32>();
        let flat = |t: Tensor<3>| t.reshape([72]);
        assert!(max(flat(ours.clone()), flat(reference.clone())) < 1e-5);
        let g1 = (ours * weights.clone()).sum().backward();
        let g2 = (reference * weights).sum().backward();
        let w = patches.projection.weight.val();
        let bias = patches.projection.bias.as_ref().unwrap();
        let (p1, p2) = (px.grad(&g1).unwrap().reshape([-1]), px.grad(&g2).unwrap().reshape([-1]));
        assert!(max(p1, p2) < 1e-5, "pixel gradient");
        let (w1, w2) = (w.grad(&g1).unwrap().reshape([-1]), w.grad(&g2).unwrap().reshape([-1]));
        assert!(max(w1, w2) < 1e-5, "weight gradient");
        assert!(
            max(bias.val().grad(&g1).unwrap(), bias.val().grad(&g2).unwrap()) < 1e-5,
            "bias gradient"
        );
    }
}
