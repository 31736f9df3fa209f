//! # flava-objectives
//!
//! FLAVA's pretraining heads and its six losses: global contrastive, masked multimodal image and
//! text, image-text matching, masked image and masked language modelling, computed only on masked
//! positions and equal in value and gradient to HF `FlavaForPreTraining` (fixtures in
//! `tests/fixtures/pretraining*`, written by `scripts/make_fixtures.py`).
//!
//! - [`heads`]: masked-prediction heads and the ITM head, HF key names.
//! - [`losses`]: gathering masked positions and cross-entropy on them.
//! - [`contrastive`]: the global contrastive loss, local or gathered across devices.
//! - [`pretraining`]: [`FlavaForPretraining`], one step's losses per task.
//! - [`accumulate`]: contrastive-exact gradient accumulation.
//! - [`checkpoint`]: loading and saving `FlavaForPreTraining` checkpoints.

pub mod accumulate;
pub mod checkpoint;
pub mod contrastive;
pub mod heads;
pub mod losses;
pub mod pretraining;

pub use accumulate::{accumulate_gradients, data_parallel_gradients, AccumulatedStep, Replica};
pub use checkpoint::{load_pretraining, save_pretraining, LoadedPretraining};
pub use contrastive::{clamp_logit_scale, contrastive_loss, AllReduceGather, EmbeddingGather, LocalGather};
pub use heads::{ItmHead, MaskedPredictionHead};
pub use pretraining::{
    CachedFeatures, Contrastive, Denominators, FlavaForPretraining, LossKind, LossWeights, Losses, MlmTargets,
    ObjectiveError, PretrainingBatch, PretrainingOutput, StepOptions,
};
