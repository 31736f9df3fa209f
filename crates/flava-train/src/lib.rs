//! # flava-train
//!
//! Thin wiring around the FLAVA crates: the `flava` command line. Today it embeds images and
//! texts with a pretrained checkpoint (`flava embed`) and converts PyTorch checkpoints to
//! safetensors (`flava convert`); the pretraining loop, checkpoints and evaluation join it with
//! the training issue.

pub mod data_cmd;
pub mod device;
pub mod dvae_cmd;
pub mod embed;

pub use device::pick_device;
