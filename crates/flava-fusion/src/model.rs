//! `FlavaModel` (HF `FlavaModel`): the image, text and multimodal towers, the contrastive
//! projections and the logit scale.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::prelude::*;
use flava_text::TextModel;
use flava_vit::encoder::{linear, linear_2d, linear_rows, EncoderOutput, Positions};
use flava_vit::ImageModel;

use crate::config::FlavaConfig;
use crate::multimodal::MultimodalModel;

/// Inputs of a [`FlavaModel::forward`] pass; any modality may be absent.
#[derive(Debug, Clone, Default)]
pub struct FlavaInput {
    /// [batch, channels, H, W] normalised pixels.
    pub pixel_values: Option<Tensor<4>>,
    /// [batch, num_patches], `true` = masked patch (replaced by the mask token).
    pub bool_masked_pos: Option<Tensor<2, Bool>>,
    /// [batch, seq] token ids.
    pub input_ids: Option<Tensor<2, Int>>,
    /// [batch, seq], 1 = token, 0 = padding.
    pub attention_mask: Option<Tensor<2, Int>>,
    /// [batch, seq] segment ids (default 0).
    pub token_type_ids: Option<Tensor<2, Int>>,
    /// Skip the fusion encoder even when both modalities are present.
    pub skip_multimodal_encoder: bool,
    /// Resize the position embeddings to the input resolution.
    pub interpolate_pos_encoding: bool,
    /// Return every layer's output of every tower.
    pub output_hidden_states: bool,
}

/// Outputs of [`FlavaModel::forward`].
#[derive(Debug, Clone)]
pub struct FlavaOutput {
    /// Image tower output; `last_hidden_state` is [batch, 1 + patches, hidden].
    pub image: Option<EncoderOutput>,
    /// Text tower output; [batch, seq, hidden].
    pub text: Option<EncoderOutput>,
    /// Fusion output; [batch, 1 + 1 + patches + seq, hidden] (CLS_M, CLS_I, patches, text).
    pub multimodal: Option<EncoderOutput>,
}

/// FLAVA's three towers with projections and logit scale. Field names follow the checkpoint keys.
#[derive(Module, Debug)]
pub struct FlavaModel {
    /// Image tower (`image_model.*`).
    pub image_model: ImageModel,
    /// Text tower (`text_model.*`).
    pub text_model: TextModel,
    /// Fusion tower (`multimodal_model.*`).
    pub multimodal_model: MultimodalModel,
    /// Image hidden → projection_dim.
    pub image_projection: Linear,
    /// Text hidden → projection_dim.
    pub text_projection: Linear,
    /// Image hidden → multimodal hidden.
    pub image_to_mm_projection: Linear,
    /// Text hidden → multimodal hidden.
    pub text_to_mm_projection: Linear,
    /// `[1]`; the checkpoint stores it 0-d. Temperature = exp(logit_scale).
    pub logit_scale: Param<Tensor<1>>,
}

impl FlavaModel {
    /// Builds a randomly initialised model (HF initialisation).
    pub fn new(cfg: &FlavaConfig, device: &Device) -> Self {
        let (ic, tc, mc) = (&cfg.image_config, &cfg.text_config, &cfg.multimodal_config);
        let std = cfg.initializer_range;
        Self {
            image_model: ImageModel::new(ic, device),
            text_model: TextModel::new(tc, device),
            multimodal_model: MultimodalModel::new(mc, device),
            image_projection: linear(ic.hidden_size, cfg.projection_dim, true, std, device),
            text_projection: linear(tc.hidden_size, cfg.projection_dim, true, std, device),
            image_to_mm_projection: linear(ic.hidden_size, mc.hidden_size, true, std, device),
            text_to_mm_projection: linear(tc.hidden_size, mc.hidden_size, true, std, device),
            logit_scale: Param::from_tensor(Tensor::from_floats([cfg.logit_scale_init_value as f32], device)),
        }
    }

    /// Runs the towers present in `input`, then the fusion encoder on the pre-final-LayerNorm
    /// states of both (HF `FlavaModel.forward`), unless skipped.
    pub fn forward(&self, input: FlavaInput) -> FlavaOutput {
        let all = input.output_hidden_states;
        let image = input.pixel_values.map(|px| {
            self.image_model
                .forward(px, input.bool_masked_pos.as_ref(), input.interpolate_pos_encoding, all)
        });
        let text = input.input_ids.map(|ids| {
            self.text_model
                .forward(ids, input.attention_mask.as_ref(), input.token_type_ids, all)
        });
        let multimodal = match (&image, &text) {
            (Some(img), Some(txt)) if !input.skip_multimodal_encoder => {
                Some(self.fuse(img, txt, input.attention_mask.as_ref(), all))
            }
            _ => None,
        };
        FlavaOutput {
            image,
            text,
            multimodal,
        }
    }

    /// The fusion pass on two tower outputs: `[CLS_M; img_to_mm(h_img); txt_to_mm(h_txt)]` with
    /// HF's mask (ones for CLS_M and the image part, the text mask for the text part).
    pub fn fuse(
        &self,
        image: &EncoderOutput,
        text: &EncoderOutput,
        text_attention_mask: Option<&Tensor<2, Int>>,
        all_hidden: bool,
    ) -> EncoderOutput {
        let (hidden, mask) = self.fusion_input(image, text, text_attention_mask);
        self.multimodal_model.forward(hidden, mask.as_ref(), all_hidden)
    }

    /// [`Self::fuse`]'s `last_hidden_state` at the rows `at` picks, [batch, m, mm hidden], with
    /// the fusion encoder's last layer run at those rows only
    /// ([`MultimodalModel::forward_at`]); row 0 is the multimodal CLS.
    pub fn fuse_at(
        &self,
        image: &EncoderOutput,
        text: &EncoderOutput,
        text_attention_mask: Option<&Tensor<2, Int>>,
        at: &Positions,
    ) -> Tensor<3> {
        let (hidden, mask) = self.fusion_input(image, text, text_attention_mask);
        self.multimodal_model.forward_at(hidden, mask.as_ref(), at)
    }

    /// The multimodal CLS, [batch, mm hidden]: [`Self::fuse_at`] at the first row.
    pub fn fuse_cls(
        &self,
        image: &EncoderOutput,
        text: &EncoderOutput,
        text_attention_mask: Option<&Tensor<2, Int>>,
    ) -> Tensor<2> {
        let x = self.fuse_at(image, text, text_attention_mask, &Positions::First);
        let [b, _, d] = x.dims();
        x.reshape([b, d])
    }

    /// The fusion encoder's input `[img_to_mm(h_img); txt_to_mm(h_txt)]` and its HF mask.
    fn fusion_input(
        &self,
        image: &EncoderOutput,
        text: &EncoderOutput,
        text_attention_mask: Option<&Tensor<2, Int>>,
    ) -> (Tensor<3>, Option<Tensor<2, Int>>) {
        let img = linear_rows(&self.image_to_mm_projection, image.pre_layernorm.clone());
        let txt = linear_rows(&self.text_to_mm_projection, text.pre_layernorm.clone());
        let [b, si, _] = img.dims();
        let mask = text_attention_mask.map(|m| {
            let n_img = si + usize::from(self.multimodal_model.cls_token.is_some());
            Tensor::cat(vec![Tensor::ones([b, n_img], &m.device()), m.clone()], 1)
        });
        (Tensor::cat(vec![img, txt], 1), mask)
    }

    /// Unnormalised contrastive image features: `image_projection` of the post-final-LayerNorm
    /// CLS token (HF `get_image_features(...).pooler_output[:, 0]`). [batch, projection_dim].
    /// The image tower's last layer runs at the CLS position only ([`ImageModel::forward_cls`]).
    pub fn image_features(&self, pixel_values: Tensor<4>) -> Tensor<2> {
        linear_2d(
            &self.image_projection,
            self.image_model.forward_cls(pixel_values, false),
        )
    }

    /// Like [`Self::image_features`] but resizing position embeddings to the input resolution.
    pub fn image_features_interpolated(&self, pixel_values: Tensor<4>) -> Tensor<2> {
        linear_2d(&self.image_projection, self.image_model.forward_cls(pixel_values, true))
    }

    /// Unnormalised contrastive text features: `text_projection` of the post-final-LayerNorm
    /// first token (the last layer runs at that position only). `input_ids`, `attention_mask`:
    /// [batch, seq]. Returns [batch, projection_dim].
    pub fn text_features(&self, input_ids: Tensor<2, Int>, attention_mask: Option<&Tensor<2, Int>>) -> Tensor<2> {
        let cls = self.text_model.forward_cls(input_ids, attention_mask, None);
        linear_2d(&self.text_projection, cls)
    }

    /// Projects token 0 of [batch, seq, hidden] states → [batch, projection_dim].
    pub fn project_cls(&self, projection: &Linear, states: Tensor<3>) -> Tensor<2> {
        let [b, _, d] = states.dims();
        linear_2d(projection, states.slice(s![.., 0..1, ..]).reshape([b, d]))
    }

    /// `exp(logit_scale) · cos(image_i, text_j)`: [n_images, n_texts] from unnormalised features.
    pub fn contrastive_logits(&self, image_features: Tensor<2>, text_features: Tensor<2>) -> Tensor<2> {
        let scale = self.logit_scale.val().exp().reshape([1, 1]);
        l2_normalize(image_features).matmul(l2_normalize(text_features).transpose()) * scale
    }
}

/// Divides each row by its L2 norm: [n, d] → [n, d] (as `torch.nn.functional.normalize`, eps 1e-12).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}
