//! The three kinds of training batch, with one spelling each.

use serde::{Deserialize, Serialize};

/// The three kinds of training batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Image-text pairs: contrastive, ITM, masked multimodal.
    Pairs,
    /// Images only: masked image modelling.
    Images,
    /// Text only: masked language modelling.
    Text,
}

impl Task {
    /// Every task, in the round-robin order.
    pub const ALL: [Task; 3] = [Task::Pairs, Task::Images, Task::Text];

    /// The one spelling of the task, in options, configs, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Task::Pairs => "pairs",
            Task::Images => "images",
            Task::Text => "text",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A task name that is none of `pairs`, `images`, `text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task `{0}` (pairs, images or text)")]
pub struct UnknownTask(pub String);

impl std::str::FromStr for Task {
    type Err = UnknownTask;
    fn from_str(s: &str) -> Result<Self, UnknownTask> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s.trim())
            .ok_or_else(|| UnknownTask(s.trim().to_string()))
    }
}
