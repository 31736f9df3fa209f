//! # flava-train
//!
//! Thin wiring around the FLAVA crates: the `flava` command line. `flava pretrain` (the training
//! loop, checkpoints, exact resume, evaluation), `flava eval` (zero-shot, retrieval), `flava embed`,
//! `flava codebook`, `flava dvae`, `flava data`, `flava masks` and `flava convert`.

pub mod alloc;
pub mod data_cmd;
pub mod device;
pub mod dvae;
pub mod dvae_cmd;
pub mod embed;
pub mod eval;
pub mod eval_cmd;
pub mod observer;
pub mod optim;
pub mod pretrain;
pub mod run_dir;
pub mod trainer;

pub use device::pick_device;
pub use observer::{Observer, StepMetrics};
pub use optim::{Optimizer, OptimizerConfig};
pub use run_dir::RunDir;
pub use trainer::{Objective, Strategy, Trainer, TrainerConfig};

/// Writes an image file atomically, refusing to replace an existing one unless `force`
/// (the format follows the extension).
pub fn save_image_file(img: &image::RgbImage, out: &std::path::Path, force: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    if out.exists() && !force {
        anyhow::bail!("{} exists; pass --force to replace it", out.display());
    }
    let format =
        image::ImageFormat::from_path(out).with_context(|| format!("{}: unknown image format", out.display()))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format)
        .with_context(|| format!("encoding {}", out.display()))?;
    flava_vit::atomic::write_file(out, bytes.get_ref()).with_context(|| format!("writing {}", out.display()))
}
