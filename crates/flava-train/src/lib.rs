//! # flava-train
//!
//! The training library and the thin `flava` command line over it:
//! - [`trainer`]: [`Trainer`], one step of any [`Objective`] under a [`Strategy`] (single,
//!   accumulated, data-parallel), with the non-finite guard; [`optim`]: parameter groups,
//!   decoupled AdamW, clipping, warmup + cosine; [`run_dir`]: atomic checkpoints, resume,
//!   metrics; [`observer`]: progress bars, metrics and fault injection hooks.
//! - [`pretrain`]: FLAVA pretraining (tokenizer, codebook, phases, checkpoints, evaluation);
//!   [`dvae`]: dVAE training; [`eval`]: zero-shot, retrieval and masked accuracy; [`embed`]:
//!   image/text embeddings.
//! - `data_cmd`, `dvae_cmd`, `eval_cmd` and `src/cli/` implement the commands of the binary
//!   (`flava pretrain`, `eval`, `embed`, `codebook`, `dvae`, `data`, `masks`, `convert`);
//!   [`alloc`]: the allocator setting binaries make at start.

pub mod adamw;
pub mod alloc;
pub mod bulk_embed;
pub mod data_cmd;
pub mod device;
pub mod distributed;
pub mod dvae;
pub mod dvae_cmd;
pub mod embed;
pub mod eval;
pub mod eval_cmd;
pub mod finetune;
pub mod hub;
pub mod metrics;
pub mod observer;
pub mod optim;
pub mod pretrain;
pub mod probe;
pub mod report;
pub mod run_dir;
pub mod task_model;
pub mod trainer;
pub mod vocabulary;

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
