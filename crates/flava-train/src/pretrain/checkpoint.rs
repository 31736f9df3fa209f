//! What a pretraining checkpoint keeps besides the model and optimizer records (the files are
//! written by [`crate::run_dir::RunDir`]): `state.json`.

use std::collections::BTreeMap;

use flava_data::loader::MixerState;
use flava_data::stream::StreamStats;
use serde::{Deserialize, Serialize};

use crate::trainer::Counters;

/// Everything besides model and optimizer needed to continue exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Updates done and the non-finite guard's counts.
    #[serde(flatten)]
    pub counters: Counters,
    /// Index of the current phase.
    pub phase: usize,
    /// Data position after the last consumed batch of the current phase.
    pub mixer: Option<MixerState>,
    /// Samples trained on.
    pub samples: u64,
    /// Training seconds so far.
    pub train_seconds: f64,
    /// Samples and skips per source (`task: source`) over the whole run, resumes included.
    #[serde(default)]
    pub data: BTreeMap<String, StreamStats>,
    /// SHA-256 of the codebook and tokenizer files the run trains with; a resume with other
    /// files is refused.
    #[serde(default)]
    pub fingerprints: BTreeMap<String, String>,
}

impl crate::run_dir::RunState for TrainState {
    fn set_counters(&mut self, counters: crate::trainer::Counters) {
        self.counters = counters;
    }
}
