//! `FlavaForPretraining`: the model, its five heads, and one pretraining step's losses
//! (HF `FlavaForPreTraining.forward`), computed only on masked positions.
//!
//! Per batch: the masked towers with fusion when both modalities are present, the unmasked
//! towers without fusion (for the contrastive loss, paired batches only; stacked with the masked
//! inputs into one pass per tower when a multimodal loss is on), and the codebook for the MIM
//! targets when none are given. The last layer of the encoder a loss reads (the tower of an
//! image-only or text-only batch, the fusion of a paired one) runs only at the rows the losses
//! read: the masked positions and the multimodal CLS (`Encoder::forward_at`); the other rows of
//! that layer reach no loss, so the losses and gradients are HF's. Image-only batch: MIM. Text-only
//! batch: MLM. Paired batch: ITM over all pairs; MMM-image, MMM-text and the contrastive rows
//! over ITM-positive pairs (every pair when none is positive, [`crate::scope`]); contrastive
//! columns are never filtered.

use burn::module::Module;
use burn::prelude::*;
use flava_dvae::ImageCodebook;
use flava_fusion::{l2_normalize, FlavaConfig, FlavaModel};
use serde::{Deserialize, Serialize};

use crate::batch::PretrainingBatch;
use crate::contrastive::{clamp_logit_scale, contrastive_loss};
use crate::heads::{ItmHead, MaskedPredictionHead};
use crate::losses::{ItmLoss, MaskedPredictionLoss};
use crate::scope::{BatchCounts, LossScope};
use flava_vit::encoder::linear_2d;
use flava_vit::{EncoderOutput, Positions};

/// Weights of the six losses in the total (HF `*_weight` config fields, all 1 by default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LossWeights {
    /// Masked image modelling (image-only batches).
    pub mim: f64,
    /// Masked language modelling (text-only batches).
    pub mlm: f64,
    /// Image-text matching.
    pub itm: f64,
    /// Global contrastive.
    pub global_contrastive: f64,
    /// Masked multimodal modelling, image side.
    pub mmm_image: f64,
    /// Masked multimodal modelling, text side.
    pub mmm_text: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            mim: 1.0,
            mlm: 1.0,
            itm: 1.0,
            global_contrastive: 1.0,
            mmm_image: 1.0,
            mmm_text: 1.0,
        }
    }
}

/// The six pretraining losses, by one name each (as in `metrics.jsonl` and [`Losses::named`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LossKind {
    /// Masked image modelling (image-only batches).
    Mim,
    /// Masked language modelling (text-only batches).
    Mlm,
    /// Image-text matching.
    Itm,
    /// Global contrastive.
    GlobalContrastive,
    /// Masked multimodal modelling, image side.
    MmmImage,
    /// Masked multimodal modelling, text side.
    MmmText,
}

impl LossKind {
    /// All six, in HF's order.
    pub const ALL: [LossKind; 6] = [
        LossKind::Mim,
        LossKind::Mlm,
        LossKind::Itm,
        LossKind::GlobalContrastive,
        LossKind::MmmImage,
        LossKind::MmmText,
    ];

    /// The name (`mim`, `mlm`, `itm`, `global_contrastive`, `mmm_image`, `mmm_text`).
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Mim => "mim",
            LossKind::Mlm => "mlm",
            LossKind::Itm => "itm",
            LossKind::GlobalContrastive => "global_contrastive",
            LossKind::MmmImage => "mmm_image",
            LossKind::MmmText => "mmm_text",
        }
    }

    /// The loss of a name; `None` for any other string.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl LossWeights {
    /// The weight of a loss.
    pub fn get(&self, kind: LossKind) -> f64 {
        match kind {
            LossKind::Mim => self.mim,
            LossKind::Mlm => self.mlm,
            LossKind::Itm => self.itm,
            LossKind::GlobalContrastive => self.global_contrastive,
            LossKind::MmmImage => self.mmm_image,
            LossKind::MmmText => self.mmm_text,
        }
    }

    /// The weights of an HF configuration.
    pub fn from_config(cfg: &FlavaConfig) -> Self {
        Self {
            mim: cfg.mim_weight,
            mlm: cfg.mlm_weight,
            itm: cfg.itm_weight,
            global_contrastive: cfg.global_contrastive_weight,
            mmm_image: cfg.mmm_image_weight,
            mmm_text: cfg.mmm_text_weight,
        }
    }
}

/// Errors of a pretraining step.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    /// Neither images nor text.
    #[error("the batch holds neither images nor text")]
    EmptyBatch,
    /// MIM/MMM-image need targets: pass `mim_targets` or a codebook with `codebook_pixel_values`.
    #[error("masked image losses need targets: give `mim_targets`, or a codebook and `codebook_pixel_values`")]
    MissingImageTargets,
    /// Sizes that do not fit together.
    #[error("inconsistent batch: {0}")]
    Shape(String),
    /// A collective between the ranks of a distributed step failed.
    #[error(transparent)]
    Collective(#[from] crate::collective::CollectiveError),
}

/// How the contrastive loss sees other samples.
#[derive(Clone, Copy, Default)]
pub enum Contrastive<'a> {
    /// This batch only.
    #[default]
    Local,
    /// Features of the other micro-batches (and devices), cached without autograd: gradient
    /// accumulation and in-process data parallelism.
    Cached(&'a CachedFeatures),
}

/// Contrastive features of a whole accumulated batch, computed without autograd.
#[derive(Debug, Clone)]
pub struct CachedFeatures {
    /// [n, d] normalised image embeddings of all micro-batches.
    pub image: Tensor<2>,
    /// [n, d] normalised text embeddings.
    pub text: Tensor<2>,
    /// Where this micro-batch's rows start.
    pub offset: usize,
    /// Rows (over all micro-batches) that count.
    pub rows: Vec<usize>,
    /// Whether the logit scale gets its gradient in this micro-batch (exactly one should).
    pub live_scale: bool,
}

/// Everything a step needs besides the batch.
#[derive(Clone, Default)]
pub struct StepOptions<'a> {
    /// Frozen codebook for MIM targets (keep it on a device without autodiff).
    pub codebook: Option<&'a ImageCodebook>,
    /// Local or cached contrastive.
    pub contrastive: Contrastive<'a>,
    /// The rows and denominators of a micro-batch within its whole batch ([`crate::scope`]);
    /// `None` = the batch's own.
    pub scope: Option<LossScope>,
}

/// The masked pass of one batch, encoded once and shared by the losses.
#[derive(Debug, Clone)]
pub struct Encodings {
    /// Image tower over the masked image: [b, 1 + patches, hidden].
    pub image: Option<EncoderOutput>,
    /// Text tower over the masked text: [b, seq, hidden].
    pub text: Option<EncoderOutput>,
    /// Multimodal encoder over both (paired batches): [b, 2 + patches + seq, hidden]
    /// (CLS_M, CLS_I, patches, text).
    pub multimodal: Option<Tensor<3>>,
}

/// The losses of one step (unweighted; `total` applies the weights). Absent = not computed
/// (wrong task, zero weight, or no masked position).
#[derive(Debug, Clone, Default)]
pub struct Losses {
    /// Masked image modelling, `[1]`.
    pub mim: Option<Tensor<1>>,
    /// Masked language modelling, `[1]`.
    pub mlm: Option<Tensor<1>>,
    /// Image-text matching, `[1]`.
    pub itm: Option<Tensor<1>>,
    /// Global contrastive, `[1]`.
    pub global_contrastive: Option<Tensor<1>>,
    /// Masked multimodal image, `[1]`.
    pub mmm_image: Option<Tensor<1>>,
    /// Masked multimodal text, `[1]`.
    pub mmm_text: Option<Tensor<1>>,
}

impl Losses {
    /// (name, loss) of the present losses, in HF's order.
    pub fn named(&self) -> Vec<(&'static str, Tensor<1>)> {
        LossKind::ALL
            .into_iter()
            .filter_map(|k| self.get(k).cloned().map(|l| (k.name(), l)))
            .collect()
    }

    /// One loss, when the batch had it.
    pub fn get(&self, kind: LossKind) -> Option<&Tensor<1>> {
        match kind {
            LossKind::Mim => self.mim.as_ref(),
            LossKind::Mlm => self.mlm.as_ref(),
            LossKind::Itm => self.itm.as_ref(),
            LossKind::GlobalContrastive => self.global_contrastive.as_ref(),
            LossKind::MmmImage => self.mmm_image.as_ref(),
            LossKind::MmmText => self.mmm_text.as_ref(),
        }
    }

    /// (name, value) of the present losses, read to the host, in HF's order.
    pub fn values(&self) -> Vec<(&'static str, f64)> {
        self.named()
            .into_iter()
            .map(|(n, l)| (n, l.into_scalar::<f64>()))
            .collect()
    }
}

/// The logits each loss used.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    /// [masked patches, image vocab].
    pub mim: Option<Tensor<2>>,
    /// [masked tokens, text vocab].
    pub mlm: Option<Tensor<2>>,
    /// [batch, 2].
    pub itm: Option<Tensor<2>>,
    /// [positive masked patches, image vocab].
    pub mmm_image: Option<Tensor<2>>,
    /// [positive masked tokens, text vocab].
    pub mmm_text: Option<Tensor<2>>,
    /// [rows, global batch].
    pub contrastive_per_image: Option<Tensor<2>>,
    /// [rows, global batch].
    pub contrastive_per_text: Option<Tensor<2>>,
}

/// What a step returns.
#[derive(Debug, Clone)]
pub struct PretrainingOutput {
    /// Each loss.
    pub losses: Losses,
    /// `Σ weight · loss` over the present losses.
    pub total: Option<Tensor<1>>,
    /// The logits behind the losses.
    pub logits: Logits,
    /// Visual-token targets used (host, row-major [batch·num_patches]).
    pub mim_targets: Option<Vec<usize>>,
    /// Normalised contrastive image embeddings of the unmasked pass, [batch, projection_dim].
    pub image_embeddings: Option<Tensor<2>>,
    /// Normalised contrastive text embeddings, [batch, projection_dim].
    pub text_embeddings: Option<Tensor<2>>,
}

/// `FlavaModel` with the MIM, MLM, ITM, MMM-image and MMM-text heads (HF `FlavaForPreTraining`
/// without the codebook, which stays frozen outside the trained module).
#[derive(Module, Debug)]
pub struct FlavaForPretraining {
    /// The towers, projections and logit scale (`flava.*`).
    pub flava: FlavaModel,
    /// Masked image modelling head (image vocabulary).
    pub mim_head: MaskedPredictionHead,
    /// Masked language modelling head (text vocabulary).
    pub mlm_head: MaskedPredictionHead,
    /// Image-text matching head.
    pub itm_head: ItmHead,
    /// Masked multimodal head, image side.
    pub mmm_image_head: MaskedPredictionHead,
    /// Masked multimodal head, text side.
    pub mmm_text_head: MaskedPredictionHead,
    /// Loss weights.
    #[module(skip)]
    pub weights: LossWeights,
}

impl FlavaForPretraining {
    /// A randomly initialised model (HF initialisation). The MMM heads read multimodal states, so
    /// image, text and multimodal hidden sizes must be equal, as HF requires.
    pub fn new(cfg: &FlavaConfig, device: &Device) -> Self {
        let (ic, tc) = (&cfg.image_config, &cfg.text_config);
        let std = cfg.initializer_range;
        let head = |h: usize, v: usize, act, eps| MaskedPredictionHead::new(h, v, act, eps, std, device);
        Self {
            flava: FlavaModel::new(cfg, device),
            mim_head: head(ic.hidden_size, ic.vocab_size, ic.hidden_act, ic.layer_norm_eps),
            mlm_head: head(tc.hidden_size, tc.vocab_size, tc.hidden_act, tc.layer_norm_eps),
            itm_head: ItmHead::new(cfg.hidden_size, std, device),
            mmm_image_head: head(ic.hidden_size, ic.vocab_size, ic.hidden_act, ic.layer_norm_eps),
            mmm_text_head: head(tc.hidden_size, tc.vocab_size, tc.hidden_act, tc.layer_norm_eps),
            weights: LossWeights::from_config(cfg),
        }
    }

    /// Clamps the stored `logit_scale` to `[0, ln 100]` (call after each optimizer step; HF clamps
    /// it in place before each use, which is the same for training).
    pub fn clamp_logit_scale_param(mut self) -> Self {
        let v = self
            .flava
            .logit_scale
            .val()
            .clamp(0.0, crate::contrastive::LOGIT_SCALE_MAX);
        // Mapping to a detached tensor would leave the parameter without autodiff tracking:
        // keep it trainable (without this the scale silently stayed at its initial value).
        self.flava.logit_scale = self.flava.logit_scale.map(|t| {
            let rg = t.is_require_grad();
            let v = v.detach();
            if rg {
                v.require_grad()
            } else {
                v
            }
        });
        self
    }

    /// Normalised contrastive embeddings from unmasked towers: ([b, proj], [b, proj]). An
    /// error unless the batch has both images and text.
    pub fn contrastive_embeddings(&self, batch: &PretrainingBatch) -> Result<(Tensor<2>, Tensor<2>), ObjectiveError> {
        let not_paired =
            || ObjectiveError::Shape("contrastive embeddings need a paired batch (images and text)".into());
        let px = batch.pixel_values.clone().ok_or_else(not_paired)?;
        let ids = batch
            .input_ids
            .clone()
            .or(batch.input_ids_masked.clone())
            .ok_or_else(not_paired)?;
        let img = self.flava.image_model.forward(px, None, false, false);
        let txt =
            self.flava
                .text_model
                .forward(ids, batch.attention_mask.as_ref(), batch.token_type_ids.clone(), false);
        let u = l2_normalize(
            self.flava
                .project_cls(&self.flava.image_projection, img.last_hidden_state),
        );
        let v = l2_normalize(
            self.flava
                .project_cls(&self.flava.text_projection, txt.last_hidden_state),
        );
        Ok((u, v))
    }

    /// Checks the host-side targets against the batch and the heads before anything runs, so
    /// that bad input is an error and not a panic in a kernel: MLM positions inside the batch,
    /// MLM targets inside the text vocabulary, ITM labels 0 or 1, one ITM label per pair.
    pub fn check_targets(&self, batch: &PretrainingBatch) -> Result<(), ObjectiveError> {
        let text_vocab = self.mlm_head.decoder.weight.dims()[1];
        if let (Some(m), Some(ids)) = (&batch.mlm, batch.input_ids_masked.as_ref().or(batch.input_ids.as_ref())) {
            let [b, s] = ids.dims();
            if m.positions.len() != m.targets.len() {
                return Err(ObjectiveError::Shape(format!(
                    "{} MLM positions but {} targets",
                    m.positions.len(),
                    m.targets.len()
                )));
            }
            if let Some(p) = m.positions.iter().find(|&&p| p >= b * s) {
                return Err(ObjectiveError::Shape(format!(
                    "MLM position {p} is outside the batch ({b} x {s} tokens)"
                )));
            }
            if let Some(t) = m.targets.iter().find(|&&t| t >= text_vocab) {
                return Err(ObjectiveError::Shape(format!(
                    "MLM target {t} is outside the text vocabulary ({text_vocab} tokens): is the tokenizer the model's?"
                )));
            }
        }
        if let Some(l) = &batch.itm_labels {
            if let Some(x) = l.iter().find(|&&x| x > 1) {
                return Err(ObjectiveError::Shape(format!("ITM label {x} is not 0 or 1")));
            }
            if batch.pixel_values.is_some() && l.len() != batch.batch_size() {
                return Err(ObjectiveError::Shape(format!(
                    "{} ITM labels for a batch of {}",
                    l.len(),
                    batch.batch_size()
                )));
            }
        }
        Ok(())
    }

    /// Visual-token targets: given, or from the codebook (run without autograd).
    fn image_targets(
        &self,
        batch: &PretrainingBatch,
        codebook: Option<&ImageCodebook>,
    ) -> Result<Vec<usize>, ObjectiveError> {
        let tokens = match (&batch.mim_targets, codebook, &batch.codebook_pixel_values) {
            (Some(t), _, _) => t.clone(),
            (None, Some(cb), Some(px)) => {
                let px = px.clone().without_autodiff();
                cb.tokens(px)
            }
            _ => return Err(ObjectiveError::MissingImageTargets),
        };
        let v = tokens
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap_or_default();
        Ok(v.into_iter().map(|t| t.max(0) as usize).collect())
    }

    /// The masked towers, and the multimodal encoder when both modalities are present: run once
    /// per step, shared by every loss.
    pub fn encode(&self, batch: &PretrainingBatch) -> Encodings {
        let (image, text) = self.masked_towers(batch);
        let multimodal = match (&image, &text) {
            (Some(img), Some(txt)) => Some(
                self.flava
                    .fuse(img, txt, batch.attention_mask.as_ref(), false)
                    .last_hidden_state,
            ),
            _ => None,
        };
        Encodings {
            image,
            text,
            multimodal,
        }
    }

    /// The towers over the masked inputs (the image tower with its mask, the text tower over
    /// the masked ids, or the plain ids without masking).
    fn masked_towers(&self, batch: &PretrainingBatch) -> (Option<EncoderOutput>, Option<EncoderOutput>) {
        let image = batch.pixel_values.clone().map(|px| {
            self.flava
                .image_model
                .forward(px, batch.bool_masked_pos.as_ref(), false, false)
        });
        let text = batch.input_ids_masked.clone().or(batch.input_ids.clone()).map(|ids| {
            self.flava
                .text_model
                .forward(ids, batch.attention_mask.as_ref(), batch.token_type_ids.clone(), false)
        });
        (image, text)
    }

    /// [`Self::masked_towers`] and [`Self::contrastive_embeddings`] of a paired batch together: each
    /// tower runs once over its masked and unmasked inputs stacked along the batch (one pass over
    /// 2b samples instead of two over b: larger products, each weight's gradient one product
    /// instead of two added, half the per-op overhead). Forward, every sample goes through the
    /// same arithmetic as in the separate passes (an unmasked image is blended with the mask token
    /// at weight 0, which leaves it unchanged); backward, each weight gradient sums the same terms
    /// in one product instead of two, so its last bits may differ. A modality without masking runs
    /// once, shared. `None` unless the batch has images and text.
    #[allow(clippy::type_complexity)]
    fn towers_with_contrastive(
        &self,
        batch: &PretrainingBatch,
    ) -> Option<(EncoderOutput, EncoderOutput, Tensor<2>, Tensor<2>)> {
        let px = batch.pixel_values.clone()?;
        let masked_ids = batch.input_ids_masked.clone().or(batch.input_ids.clone())?;
        let ids = batch.input_ids.clone().or(batch.input_ids_masked.clone())?;
        let b = px.dims()[0];
        if b == 0 {
            return None;
        }
        let device = px.device();
        let cls = |t: Tensor<3>| {
            let [n, _, d] = t.dims();
            t.slice(s![.., 0..1, ..]).reshape([n, d])
        };

        // Stacked, the masked inputs first: their last layer runs at every row (the fusion reads
        // them all), the unmasked ones' at the CLS alone (the contrastive loss reads only that).
        let image_model = &self.flava.image_model;
        let (image, image_cls) = match &batch.bool_masked_pos {
            Some(m) => {
                let unmasked = Tensor::<2, Bool>::from_data(
                    TensorData::new(vec![false; m.dims().iter().product()], m.dims()),
                    &device,
                );
                let mask = Tensor::cat(vec![m.clone(), unmasked], 0);
                image_model.forward_split(Tensor::cat(vec![px.clone(), px], 0), Some(&mask), b)
            }
            None => {
                let out = image_model.forward(px, None, false, false);
                let states = cls(out.last_hidden_state.clone());
                (out, states)
            }
        };
        let text_model = &self.flava.text_model;
        let (text, text_cls) = if batch.input_ids_masked.is_some() && batch.input_ids.is_some() {
            let twice = |t: &Tensor<2, Int>| Tensor::cat(vec![t.clone(), t.clone()], 0);
            let mask = batch.attention_mask.as_ref().map(twice);
            let types = batch.token_type_ids.as_ref().map(twice);
            text_model.forward_split(Tensor::cat(vec![masked_ids, ids], 0), mask.as_ref(), types, b)
        } else {
            let out = text_model.forward(
                masked_ids,
                batch.attention_mask.as_ref(),
                batch.token_type_ids.clone(),
                false,
            );
            let states = cls(out.last_hidden_state.clone());
            (out, states)
        };

        let u = l2_normalize(linear_2d(&self.flava.image_projection, image_cls));
        let v = l2_normalize(linear_2d(&self.flava.text_projection, text_cls));
        Some((image, text, u, v))
    }

    /// One step's losses on `batch` (see the module docs for which losses each task gets).
    pub fn forward(
        &self,
        batch: &PretrainingBatch,
        opts: &StepOptions<'_>,
    ) -> Result<PretrainingOutput, ObjectiveError> {
        let w = self.weights;
        let has_image = batch.pixel_values.is_some();
        let has_text = batch.input_ids_masked.is_some() || batch.input_ids.is_some();
        if !has_image && !has_text {
            return Err(ObjectiveError::EmptyBatch);
        }
        self.check_targets(batch)?;
        let paired = has_image && has_text;
        let b = batch.batch_size();
        let counts = BatchCounts::of(batch);
        let scope = opts.scope.clone().unwrap_or_else(|| LossScope::of(&counts));
        let den = scope.denominators;
        let mut losses = Losses::default();
        let mut logits = Logits::default();

        let masked = &counts.masked;
        let needs_targets = has_image && ((paired && w.mmm_image > 0.0) || (!paired && w.mim > 0.0));
        let mim_targets = match (masked, needs_targets) {
            (Some(_), true) => Some(self.image_targets(batch, opts.codebook)?),
            _ => None,
        };
        if let (Some((m, p)), Some(t)) = (masked, &mim_targets) {
            if m.len() != t.len() || m.len() != b * p {
                return Err(ObjectiveError::Shape(format!(
                    "{} mask entries, {} image targets, batch {b} x {p} patches",
                    m.len(),
                    t.len()
                )));
            }
        }
        // Masked positions (flat `b·P + p`) and their visual tokens, of the rows `keep` accepts.
        let image_positions = |keep: &dyn Fn(usize) -> bool| -> Option<(Vec<usize>, Vec<usize>)> {
            let ((m, p), t) = (masked.as_ref()?, mim_targets.as_ref()?);
            let pos: Vec<usize> = (0..m.len()).filter(|&i| m[i] && keep(i / p)).collect();
            let tgt = pos.iter().map(|&i| t[i]).collect();
            Some((pos, tgt))
        };

        let contrastive_rows = match opts.contrastive {
            Contrastive::Cached(c) => c.rows.len(),
            Contrastive::Local => scope.rows.len(),
        };
        let wants_contrastive = paired && w.global_contrastive > 0.0 && contrastive_rows > 0;
        // Stacked towers only when a multimodal loss uses the masked ones too: with the
        // contrastive loss alone the mask token would get a gradient (of zeros) it never had.
        let multimodal_losses = w.itm > 0.0 || w.mmm_image > 0.0 || w.mmm_text > 0.0;
        let stacked = wants_contrastive && multimodal_losses;
        let device = self.flava.logit_scale.val().device();
        // Each last layer runs at the rows the losses read, and nowhere else (its other rows
        // would be read by nobody): the masked positions, and the CLS token of the fusion.
        let mut paired_towers = None;
        if !paired {
            if let (Some(px), Some((pos, tgt)), true) = (&batch.pixel_values, image_positions(&|_| true), w.mim > 0.0) {
                let p = masked.as_ref().map_or(0, |(_, p)| *p);
                // The image sequence is [CLS, patches]: patch j of sample i is row 1 + j.
                let row = |i: usize| (i / p, 1 + i % p);
                if let Some((at, rows)) =
                    LossRows::of(b, pos.iter().map(|&i| row(i))).map(|r| (r.positions(&device), r))
                {
                    let states =
                        self.flava
                            .image_model
                            .forward_at(px.clone(), batch.bool_masked_pos.as_ref(), false, &at);
                    let read: Vec<usize> = pos.iter().map(|&i| rows.flat(row(i))).collect();
                    let head = MaskedPredictionLoss { head: &self.mim_head };
                    if let Some(o) = head.forward(states, &read, &tgt, den.mim) {
                        losses.mim = Some(o.loss);
                        logits.mim = Some(o.logits);
                    }
                }
            }
            let ids = batch.input_ids_masked.as_ref().or(batch.input_ids.as_ref());
            if let (Some(ids), Some(mlm), true) = (ids, &batch.mlm, w.mlm > 0.0) {
                let l = ids.dims()[1];
                let row = |i: usize| (i / l, i % l);
                if let Some(rows) = LossRows::of(b, mlm.positions.iter().map(|&i| row(i))) {
                    let states = self.flava.text_model.forward_at(
                        ids.clone(),
                        batch.attention_mask.as_ref(),
                        batch.token_type_ids.clone(),
                        &rows.positions(&device),
                    );
                    let read: Vec<usize> = mlm.positions.iter().map(|&i| rows.flat(row(i))).collect();
                    let head = MaskedPredictionLoss { head: &self.mlm_head };
                    if let Some(o) = head.forward(states, &read, &mlm.targets, den.mlm) {
                        losses.mlm = Some(o.loss);
                        logits.mlm = Some(o.logits);
                    }
                }
            }
        } else {
            paired_towers = match stacked.then(|| self.towers_with_contrastive(batch)).flatten() {
                Some((image, text, u, v)) => Some((image, text, Some((u, v)))),
                None => match self.masked_towers(batch) {
                    (Some(image), Some(text)) => Some((image, text, None)),
                    _ => None,
                },
            };
        }

        let (mut image_embeddings, mut text_embeddings) = (None, None);
        if let Some((image, text, mut unmasked)) = paired_towers {
            let l = text.last_hidden_state.dims()[1];
            // The fusion's sequence: [CLS_M, CLS_I, patches, text].
            let s_mm =
                usize::from(self.flava.multimodal_model.cls_token.is_some()) + image.last_hidden_state.dims()[1] + l;
            let p = masked.as_ref().map_or(0, |(_, p)| *p);
            let image_row = |i: usize| (i / p, 2 + i % p);
            let text_row = |i: usize| (i / l, s_mm - l + i % l);
            let mmm_image = image_positions(&|r| scope.counts_row(r)).filter(|_| w.mmm_image > 0.0);
            let mmm_text: Option<(Vec<usize>, Vec<usize>)> = match (&batch.mlm, w.mmm_text > 0.0) {
                (Some(mlm), true) => Some(
                    mlm.positions
                        .iter()
                        .zip(&mlm.targets)
                        .filter(|(&i, _)| scope.counts_row(i / l))
                        .map(|(&i, &t)| (i, t))
                        .unzip(),
                ),
                _ => None,
            };
            // Row 0 (the multimodal CLS, read by ITM) of every sample, then the masked rows.
            let cls = (0..b).map(|i| (i, 0));
            let image_rows = mmm_image.iter().flat_map(|(pos, _)| pos.iter().map(|&i| image_row(i)));
            let text_rows = mmm_text.iter().flat_map(|(pos, _)| pos.iter().map(|&i| text_row(i)));
            let rows = LossRows::of(b, cls.chain(image_rows).chain(text_rows));
            if let (Some(rows), true) = (rows, multimodal_losses) {
                let mm = self
                    .flava
                    .fuse_at(&image, &text, batch.attention_mask.as_ref(), &rows.positions(&device));
                if w.itm > 0.0 {
                    if let Some(labels) = &batch.itm_labels {
                        if labels.len() != b {
                            return Err(ObjectiveError::Shape(format!(
                                "{} ITM labels for {b} pairs",
                                labels.len()
                            )));
                        }
                    }
                    let o = ItmLoss { head: &self.itm_head }.forward(mm.clone(), batch.itm_labels.as_deref(), den.itm);
                    losses.itm = o.loss;
                    logits.itm = Some(o.logits);
                }
                if let Some((pos, tgt)) = mmm_image {
                    let read: Vec<usize> = pos.iter().map(|&i| rows.flat(image_row(i))).collect();
                    let head = MaskedPredictionLoss {
                        head: &self.mmm_image_head,
                    };
                    if let Some(o) = head.forward(mm.clone(), &read, &tgt, den.mmm_image) {
                        losses.mmm_image = Some(o.loss);
                        logits.mmm_image = Some(o.logits);
                    }
                }
                if let Some((pos, tgt)) = mmm_text {
                    let read: Vec<usize> = pos.iter().map(|&i| rows.flat(text_row(i))).collect();
                    let head = MaskedPredictionLoss {
                        head: &self.mmm_text_head,
                    };
                    if let Some(o) = head.forward(mm, &read, &tgt, den.mmm_text) {
                        losses.mmm_text = Some(o.loss);
                        logits.mmm_text = Some(o.logits);
                    }
                }
            }
            if wants_contrastive {
                let (u, v) = match unmasked.take() {
                    Some(uv) => uv,
                    None => self.contrastive_embeddings(batch)?,
                };
                let scale = clamp_logit_scale(self.flava.logit_scale.val());
                let out = match opts.contrastive {
                    Contrastive::Local => {
                        contrastive_loss(u.clone(), v.clone(), u.clone(), v.clone(), 0, scale, &scope.rows)
                    }
                    Contrastive::Cached(c) => {
                        let mix = |cache: &Tensor<2>, live: Tensor<2>| {
                            let n = cache.dims()[0];
                            let device = live.device();
                            let cache = cache.clone().to_device(&device).detach();
                            let mut parts = Vec::new();
                            if c.offset > 0 {
                                parts.push(cache.clone().slice(s![0..c.offset, ..]));
                            }
                            parts.push(live);
                            if c.offset + b < n {
                                parts.push(cache.slice(s![c.offset + b..n, ..]));
                            }
                            Tensor::cat(parts, 0)
                        };
                        let (ua, va) = (mix(&c.image, u.clone()), mix(&c.text, v.clone()));
                        let scale = if c.live_scale { scale } else { scale.detach() };
                        contrastive_loss(ua.clone(), va.clone(), ua, va, 0, scale, &c.rows)
                    }
                };
                losses.global_contrastive = Some(out.loss);
                logits.contrastive_per_image = Some(out.logits_per_image);
                logits.contrastive_per_text = Some(out.logits_per_text);
                image_embeddings = Some(u);
                text_embeddings = Some(v);
            }
        }

        let total = LossKind::ALL
            .into_iter()
            .filter_map(|k| losses.get(k).cloned().map(|l| l * w.get(k)))
            .reduce(|a, b| a + b);
        Ok(PretrainingOutput {
            losses,
            total,
            logits,
            mim_targets,
            image_embeddings,
            text_embeddings,
        })
    }
}

/// The rows of each sample that the losses read from a last layer ([`Positions::Rows`]): sorted
/// and without repeats per sample, padded to one count per sample with the sample's first row.
struct LossRows {
    rows: Vec<Vec<usize>>,
    width: usize,
}

impl LossRows {
    /// From `(sample, row)` pairs of a batch of `b` samples; `None` without any pair.
    fn of(b: usize, read: impl IntoIterator<Item = (usize, usize)>) -> Option<Self> {
        let mut rows = vec![Vec::new(); b];
        for (i, r) in read {
            let v: &mut Vec<usize> = &mut rows[i];
            if let Err(at) = v.binary_search(&r) {
                v.insert(at, r);
            }
        }
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        (width > 0).then_some(Self { rows, width })
    }

    /// The padded `[b, width]` index (a sample without rows repeats row 0).
    fn positions(&self, device: &Device) -> Positions {
        let index: Vec<i64> = self
            .rows
            .iter()
            .flat_map(|v| (0..self.width).map(move |j| *v.get(j).or(v.first()).unwrap_or(&0) as i64))
            .collect();
        let b = self.rows.len();
        Positions::Rows(Tensor::from_data(TensorData::new(index, [b, self.width]), device))
    }

    /// Where `(sample, row)` lands in the `[b, width, hidden]` output, flat (`sample·width + j`).
    /// The pair must be one of those given to [`Self::of`].
    fn flat(&self, (i, r): (usize, usize)) -> usize {
        let j = self.rows[i].binary_search(&r).unwrap_or(0);
        i * self.width + j
    }
}

#[cfg(test)]
mod loss_rows_tests {
    use super::*;

    #[test]
    fn rows_are_sorted_deduplicated_padded_and_found() {
        let rows = LossRows::of(3, [(0, 5), (0, 0), (2, 7), (0, 5), (0, 3)]).expect("rows");
        assert_eq!(rows.rows, vec![vec![0, 3, 5], vec![], vec![7]]);
        let Positions::Rows(index) = rows.positions(&Device::flex()) else {
            panic!("rows")
        };
        let got = index.into_data().convert::<i64>().try_to_vec::<i64>().expect("i64");
        assert_eq!(got, vec![0, 3, 5, 0, 0, 0, 7, 7, 7]);
        assert_eq!([(0, 0), (0, 3), (0, 5), (2, 7)].map(|p| rows.flat(p)), [0, 1, 2, 6]);
        assert!(LossRows::of(2, []).is_none());
    }
}

#[cfg(test)]
mod loss_kind_tests {
    use super::*;

    #[test]
    fn every_loss_has_one_name_and_its_own_weight() {
        let w = LossWeights {
            mim: 1.0,
            mlm: 2.0,
            itm: 3.0,
            global_contrastive: 4.0,
            mmm_image: 5.0,
            mmm_text: 6.0,
        };
        let got: Vec<f64> = LossKind::ALL.iter().map(|&k| w.get(k)).collect();
        assert_eq!(got, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        for k in LossKind::ALL {
            assert_eq!(LossKind::from_name(k.name()), Some(k));
        }
        // An unknown name is not silently some loss (it was the MMM-text weight before).
        assert_eq!(LossKind::from_name("mmm-text"), None);
        assert_eq!(LossKind::from_name("contrastive"), None);
    }
}
