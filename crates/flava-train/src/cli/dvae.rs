//! `flava dvae train` and `flava dvae reconstruct`.

use std::path::PathBuf;

use clap::Subcommand;
use flava_train::{dvae_cmd, pick_device};

/// The dVAE commands.
#[derive(Subcommand)]
pub enum DvaeCommand {
    /// Train on any image source (synthetic by default); the codebook is saved in the HF layout.
    Train {
        /// Image source spec.
        #[arg(long, default_value = "synthetic")]
        images: String,
        /// Held-out images for the final evaluation.
        #[arg(long, default_value = "synthetic:heldout")]
        eval: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// JSON file with any `DvaeTrainConfig` fields.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Optimizer steps (overrides the config).
        #[arg(long)]
        steps: Option<usize>,
        /// Stop after this many seconds (overrides the config).
        #[arg(long)]
        time_limit: Option<f64>,
        /// Continue from the newest checkpoint in `OUT/checkpoints/`.
        #[arg(long, conflicts_with = "force")]
        resume: bool,
        /// Start over in an --out that holds a previous dVAE run (its files are deleted first).
        #[arg(long)]
        force: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Write an image and its reconstruction side by side.
    Reconstruct {
        /// A directory written by `flava dvae train`.
        #[arg(long)]
        model: PathBuf,
        /// The image.
        #[arg(long)]
        image: PathBuf,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
}

/// Runs the command.
pub fn run(c: DvaeCommand) -> anyhow::Result<()> {
    match c {
        DvaeCommand::Train {
            images,
            eval,
            out,
            config,
            steps,
            time_limit,
            resume,
            force,
            device,
        } => {
            let device = pick_device(&device)?;
            let mut cfg: flava_dvae::dvae::DvaeTrainConfig = match &config {
                Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
                None => Default::default(),
            };
            if let Some(s) = steps {
                cfg.steps = s;
            }
            if time_limit.is_some() {
                cfg.time_limit_s = time_limit;
            }
            if force {
                dvae_cmd::remove_previous(&out)?;
            }
            dvae_cmd::train_cmd(
                &images,
                &eval,
                &out,
                cfg,
                resume,
                &device,
                &mut flava_train::observer::ProgressBars::new(),
            )?;
        }
        DvaeCommand::Reconstruct {
            model,
            image,
            out,
            force,
        } => {
            dvae_cmd::reconstruct_cmd(&model, &image, &out, force, &burn::prelude::Device::flex())?;
            println!("wrote {} (original | reconstruction)", out.display());
        }
    }
    Ok(())
}
