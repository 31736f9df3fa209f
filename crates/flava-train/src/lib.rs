//! # flava-train
//!
//! Thin wiring around the FLAVA crates: the `flava` command line. `flava pretrain` (the training
//! loop, checkpoints, exact resume, evaluation), `flava eval` (zero-shot, retrieval), `flava embed`,
//! `flava codebook`, `flava dvae`, `flava data`, `flava masks` and `flava convert`.

pub mod data_cmd;
pub mod device;
pub mod dvae_cmd;
pub mod embed;
pub mod eval;
pub mod eval_cmd;
pub mod pretrain;

pub use device::pick_device;
