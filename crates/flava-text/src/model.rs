//! The FLAVA text encoder (HF `FlavaTextModel`): BERT embeddings (word + position + token type,
//! then LayerNorm), the shared pre-LN encoder with a padding mask, final LayerNorm, tanh pooler.

use burn::module::{Initializer, Module};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;
use flava_vit::encoder::{layer_norm, padding_mask, Encoder, EncoderOutput, Pooler, Positions};
use flava_vit::kernels;
use flava_vit::LayerNorm;

use crate::config::FlavaTextConfig;

/// BERT-style embeddings (HF `FlavaTextEmbeddings`).
#[derive(Module, Debug)]
pub struct TextEmbeddings {
    /// [vocab, hidden]
    pub word_embeddings: Embedding,
    /// [max_positions, hidden]; position ids are 0..L-1.
    pub position_embeddings: Embedding,
    /// [type_vocab, hidden]
    pub token_type_embeddings: Embedding,
    /// LayerNorm on the sum (checkpoint key `LayerNorm`).
    pub layer_norm: LayerNorm,
}

fn embedding(n: usize, d: usize, std: f64, device: &Device) -> Embedding {
    EmbeddingConfig::new(n, d)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

impl TextEmbeddings {
    /// Builds randomly initialised embeddings (N(0, initializer_range) as HF).
    pub fn new(cfg: &FlavaTextConfig, device: &Device) -> Self {
        let (d, std) = (cfg.hidden_size, cfg.initializer_range);
        Self {
            word_embeddings: embedding(cfg.vocab_size, d, std, device),
            position_embeddings: embedding(cfg.max_position_embeddings, d, std, device),
            token_type_embeddings: embedding(cfg.type_vocab_size, d, std, device),
            layer_norm: layer_norm(d, cfg.layer_norm_eps, device),
        }
    }

    /// `input_ids`, `token_type_ids`: [batch, seq] → [batch, seq, hidden].
    pub fn forward(&self, input_ids: Tensor<2, Int>, token_type_ids: Option<Tensor<2, Int>>) -> Tensor<3> {
        let [b, l] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<1, Int>::arange(0..l as i64, &device).reshape([1, l]);
        let types = token_type_ids.unwrap_or_else(|| Tensor::zeros([b, l], &device));
        // The lookups through the kernel (see `flava_vit::kernels::embedding`); the modules hold
        // the tables under the checkpoint's names.
        let lookup = |e: &Embedding, ids: Tensor<2, Int>| kernels::embedding(e.weight.val(), ids);
        let x = lookup(&self.word_embeddings, input_ids)
            + lookup(&self.token_type_embeddings, types)
            + lookup(&self.position_embeddings, positions);
        self.layer_norm.forward(x)
    }
}

/// The FLAVA text tower (HF `FlavaTextModel`).
#[derive(Module, Debug)]
pub struct TextModel {
    /// Token, position and type embeddings.
    pub embeddings: TextEmbeddings,
    /// Pre-LN transformer layers.
    pub encoder: Encoder,
    /// Final LayerNorm.
    pub layernorm: LayerNorm,
    /// Tanh pooler on the first token.
    pub pooler: Pooler,
}

impl TextModel {
    /// Builds a randomly initialised text tower (HF initialisation).
    pub fn new(cfg: &FlavaTextConfig, device: &Device) -> Self {
        Self {
            embeddings: TextEmbeddings::new(cfg, device),
            encoder: Encoder::new(&cfg.encoder(), device),
            layernorm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, device),
            pooler: Pooler::new(cfg.hidden_size, cfg.initializer_range, device),
        }
    }

    /// Encodes token ids.
    ///
    /// `input_ids`: [batch, seq]; `attention_mask`: [batch, seq] with 1 = token, 0 = padding
    /// (HF convention; `None` attends to everything, as HF does); `token_type_ids`: [batch, seq]
    /// (default 0).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
        all_hidden: bool,
    ) -> EncoderOutput {
        let x = self.embeddings.forward(input_ids, token_type_ids);
        let pad = attention_mask.map(padding_mask);
        let (pre_layernorm, hidden_states) = self.encoder.forward(x, pad.as_ref(), all_hidden);
        EncoderOutput::finish(pre_layernorm, &self.layernorm, &self.pooler, hidden_states)
    }

    /// `forward(input_ids, attention_mask, token_type_ids, false).last_hidden_state` at the
    /// rows `at` picks, [batch, m, hidden], with the last layer run at those rows only
    /// ([`flava_vit::Encoder::forward_at`]).
    pub fn forward_at(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
        at: &Positions,
    ) -> Tensor<3> {
        let x = self.embeddings.forward(input_ids, token_type_ids);
        let pad = attention_mask.map(padding_mask);
        self.layernorm.forward(self.encoder.forward_at(x, pad.as_ref(), at))
    }

    /// One pass over a batch whose first `n` samples are read whole and the others only at
    /// their first token ([`flava_vit::Encoder::forward_split`]): the first `n` samples' output
    /// as [`Self::forward`] gives it (no `hidden_states`), and the others'
    /// `last_hidden_state[:, 0]`, [batch − n, hidden].
    ///
    /// # Panics
    /// Unless `0 < n < batch`.
    pub fn forward_split(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
        n: usize,
    ) -> (EncoderOutput, Tensor<2>) {
        let x = self.embeddings.forward(input_ids, token_type_ids);
        let pad = attention_mask.map(padding_mask);
        let (whole, first) = self.encoder.forward_split(x, pad.as_ref(), n);
        let [m, _, d] = first.dims();
        let out = EncoderOutput::finish(whole, &self.layernorm, &self.pooler, None);
        (out, self.layernorm.forward(first).reshape([m, d]))
    }

    /// `forward(..).last_hidden_state[:, 0]`, [batch, hidden], with the last layer run at the
    /// first position only: what contrastive features and classification heads read.
    pub fn forward_cls(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
    ) -> Tensor<2> {
        let x = self.forward_at(input_ids, attention_mask, token_type_ids, &Positions::First);
        let [b, _, d] = x.dims();
        x.reshape([b, d])
    }
}
