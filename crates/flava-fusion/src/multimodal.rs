//! The multimodal (fusion) encoder (HF `FlavaMultimodalModel`): a CLS token prepended to the
//! projected image and text states, the shared pre-LN encoder, final LayerNorm and tanh pooler.

use burn::module::{Module, Param};
use burn::prelude::*;
use flava_vit::encoder::{layer_norm, padding_mask, Encoder, EncoderOutput, Pooler, Positions};
use flava_vit::LayerNorm;

use crate::config::FlavaMultimodalConfig;

/// The fusion tower.
#[derive(Module, Debug)]
pub struct MultimodalModel {
    /// [1, 1, hidden]; present when `use_cls_token`.
    pub cls_token: Option<Param<Tensor<3>>>,
    /// Pre-LN transformer layers.
    pub encoder: Encoder,
    /// Final LayerNorm.
    pub layernorm: LayerNorm,
    /// Tanh pooler (unused by the pretraining losses; the ITM head has its own).
    pub pooler: Pooler,
}

impl MultimodalModel {
    /// Builds a randomly initialised fusion tower; the CLS token is drawn from N(0, std) rather
    /// than HF's zeros, for the LayerNorm reason given at `flava_vit::vit::ImageEmbeddings::new`.
    pub fn new(cfg: &FlavaMultimodalConfig, device: &Device) -> Self {
        Self {
            cls_token: cfg
                .use_cls_token
                .then(|| flava_vit::vit::normal_param([1, 1, cfg.hidden_size], cfg.initializer_range, device)),
            encoder: Encoder::new(&cfg.encoder(), device),
            layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, device),
            pooler: Pooler::new(cfg.hidden_size, cfg.initializer_range, device),
        }
    }

    /// `hidden`: [batch, seq, hidden] (projected image states then text states);
    /// `attention_mask`: [batch, (1 +) seq] in HF convention (1 = attend), covering the CLS token
    /// when there is one. Returns states of [batch, 1 + seq, hidden].
    pub fn forward(
        &self,
        hidden: Tensor<3>,
        attention_mask: Option<&Tensor<2, Int>>,
        all_hidden: bool,
    ) -> EncoderOutput {
        let x = self.with_cls(hidden);
        let pad = attention_mask.map(padding_mask);
        let (pre_layernorm, hidden_states) = self.encoder.forward(x, pad.as_ref(), all_hidden);
        EncoderOutput::finish(pre_layernorm, &self.layernorm, &self.pooler, hidden_states)
    }

    /// `forward(hidden, attention_mask, false).last_hidden_state` at the rows `at` picks,
    /// [batch, m, hidden], with the last layer run at those rows only
    /// ([`flava_vit::Encoder::forward_at`]); rows count the CLS token when there is one.
    pub fn forward_at(&self, hidden: Tensor<3>, attention_mask: Option<&Tensor<2, Int>>, at: &Positions) -> Tensor<3> {
        let x = self.with_cls(hidden);
        let pad = attention_mask.map(padding_mask);
        self.layernorm.forward(self.encoder.forward_at(x, pad.as_ref(), at))
    }

    /// `[CLS_M; hidden]` when the model has a CLS token, else `hidden`.
    fn with_cls(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [b, _, d] = hidden.dims();
        match &self.cls_token {
            Some(cls) => Tensor::cat(vec![cls.val().expand([b, 1, d]), hidden], 1),
            None => hidden,
        }
    }
}
