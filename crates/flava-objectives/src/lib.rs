//! # flava-objectives
//!
//! FLAVA's pretraining heads and its six losses: global contrastive, masked multimodal image and
//! text, image-text matching, masked image and masked language modelling, computed only on masked
//! positions and equal in value and gradient to HF `FlavaForPreTraining` (fixtures in
//! `tests/fixtures/pretraining*`, written by `scripts/make_fixtures.py`).
//!
//! Composed as torchmultimodal composes them: [`FlavaForPretraining::encode`] runs the towers
//! once ([`Encodings`]); each loss is its own type returning `{loss, logits}`; [`scope`] is the
//! one place that decides which rows count and what each mean divides by. A training step runs
//! each encoder's last layer only at the rows its losses read (masked positions, the multimodal
//! CLS): the same losses and gradients for fewer products.
//!
//! - [`batch`]: [`PretrainingBatch`], one batch of one task, and its MLM targets.
//! - [`heads`]: masked-prediction heads and the ITM head, HF key names.
//! - [`losses`]: [`MaskedPredictionLoss`] (MIM, MLM, MMM), [`ItmLoss`], cross-entropy on gathered
//!   positions.
//! - [`contrastive`]: the global contrastive loss against the whole batch's embeddings.
//! - [`scope`]: positive rows and loss denominators, for one batch or its micro-batches.
//! - [`pretraining`]: [`FlavaForPretraining`], one step's losses per task.
//! - [`classification`]: downstream task heads ([`FlavaForClassification`]) and their losses.
//! - [`accumulate`]: contrastive-exact gradient accumulation, in-process data parallelism and the
//!   distributed step over a process group.
//! - [`collective`]: the process group ([`ProcessGroup`]) and gradient all-reduce / weight
//!   broadcast over it.
//! - [`checkpoint`]: loading and saving `FlavaForPreTraining` checkpoints.

pub mod accumulate;
pub mod batch;
pub mod checkpoint;
pub mod classification;
pub mod collective;
pub mod contrastive;
pub mod heads;
pub mod losses;
pub mod pretraining;
pub mod scope;

pub use accumulate::{accumulate_gradients, data_parallel_gradients, distributed_gradients, AccumulatedStep, Replica};
pub use batch::{MlmTargets, PretrainingBatch};
pub use checkpoint::{load_pretraining, save_pretraining, LoadedPretraining};
pub use classification::{
    cls_features, ClassificationError, ClassifierConfig, ClassifierHead, FlavaForClassification, TaskTargets,
};
pub use collective::{
    all_gather_json, all_reduce_gradients, broadcast_module, materialize, CollectiveError, LocalGroup, ProcessGroup,
    SingleProcess,
};
pub use contrastive::{clamp_logit_scale, contrastive_loss, ContrastiveOutput};
pub use heads::{ItmHead, MaskedPredictionHead};
pub use losses::{ItmLoss, ItmOutput, LossOutput, MaskedPredictionLoss};
pub use pretraining::{
    CachedFeatures, Contrastive, Encodings, FlavaForPretraining, LossKind, LossWeights, Losses, ObjectiveError,
    PretrainingOutput, StepOptions,
};
pub use scope::{scopes, BatchCounts, Denominators, LossScope};
