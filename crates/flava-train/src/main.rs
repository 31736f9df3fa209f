//! The `flava` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flava_data::masking::BlockMaskConfig;
use flava_data::stream::{SourceOptions, Task};
use flava_fusion::checkpoint::{convert_to_safetensors, find_weights};
use flava_train::{data_cmd, embed, pick_device};

#[derive(Parser)]
#[command(
    name = "flava",
    version,
    about = "FLAVA in Rust: embed, convert, and (soon) pretrain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Image and text features, and their contrastive logits, from an HF-format FLAVA directory.
    Embed {
        /// Model directory: config.json, model.safetensors or pytorch_model.bin, tokenizer.json
        /// (or vocab.txt), preprocessor_config.json.
        #[arg(long)]
        model: PathBuf,
        /// An image file (repeatable).
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// A text (repeatable).
        #[arg(long = "text")]
        texts: Vec<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Compute device: flex (CPU), cuda or wgpu (GPU features must be compiled in).
        #[arg(long, default_value = "flex")]
        device: String,
        /// Text length in tokens, [CLS] and [SEP] included.
        #[arg(long, default_value_t = flava_text::DEFAULT_MAX_LENGTH)]
        max_length: usize,
        /// Also print the ITM head's match probability for every (image, text) pair (needs a
        /// FlavaForPreTraining checkpoint).
        #[arg(long)]
        itm: bool,
    },
    /// Visual tokens of images from a codebook (or a full FLAVA directory's codebook).
    Codebook {
        /// A codebook directory (`facebook/flava-image-codebook` layout) or a FLAVA directory.
        #[arg(long)]
        model: PathBuf,
        /// An image file (repeatable).
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// Print `{"tokens": [[u32; h*w]; n]}`.
        #[arg(long)]
        json: bool,
        /// Compute device: flex, cuda or wgpu.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Train a dVAE image tokenizer, or reconstruct an image with one.
    Dvae {
        #[command(subcommand)]
        command: DvaeCommand,
    },
    /// Draw BEiT block masks, to see and tune the masking.
    Masks {
        /// Patch grid, ROWSxCOLS.
        #[arg(long, default_value = "14x14")]
        grid: String,
        /// Most patches masked per image.
        #[arg(long, default_value_t = 75)]
        num_masking_patches: usize,
        /// Smallest block area.
        #[arg(long, default_value_t = 16)]
        min_patches: usize,
        /// Largest block area (default: the number of masking patches).
        #[arg(long)]
        max_patches: Option<usize>,
        /// Smallest block aspect ratio.
        #[arg(long, default_value_t = 0.3)]
        min_aspect: f64,
        /// Masks to draw.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also draw the masks into this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
        /// Print `{"masks": [[0|1; rows*cols]; samples]}` (row-major).
        #[arg(long)]
        json: bool,
    },
    /// Data utilities: write any source as WebDataset shards, inspect shards.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Convert a PyTorch checkpoint (`pytorch_model.bin`, `.pt`) to `model.safetensors`,
    /// without executing any pickled code.
    Convert {
        /// A `.bin`/`.pt` file, or a directory holding `pytorch_model.bin`.
        input: PathBuf,
        /// Output file (default: `model.safetensors` beside the input).
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DvaeCommand {
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
        /// Continue from `OUT/checkpoint`.
        #[arg(long)]
        resume: bool,
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
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a source (synthetic, shards, CSV, COCO, ImageFolder, text) as WebDataset shards.
    Shards {
        /// The source spec.
        #[arg(long)]
        from: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// What to read: pairs, images or text.
        #[arg(long, default_value = "pairs")]
        task: String,
        /// Stop after this many samples (the synthetic source has 20,000 per epoch).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Count samples and members of shards (`data/{000..009}.tar`) and show the first sample.
    Inspect {
        /// Shard file or brace pattern.
        shards: String,
    },
}

fn parse_task(s: &str) -> anyhow::Result<Task> {
    match s {
        "pairs" => Ok(Task::Pairs),
        "images" => Ok(Task::Images),
        "text" => Ok(Task::Text),
        other => anyhow::bail!("unknown task `{other}` (pairs, images, text)"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Embed {
            model,
            images,
            texts,
            json,
            device,
            max_length,
            itm,
        } => {
            let device = pick_device(&device)?;
            let out = embed::run(&model, &images, &texts, max_length, itm, &device)?;
            if json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                print!("{}", embed::render(&out, &images, &texts));
            }
        }
        Command::Codebook {
            model,
            images,
            json,
            device,
        } => {
            let device = pick_device(&device)?;
            let (tokens, side) = embed::codebook_tokens(&model, &images, &device)?;
            if json {
                println!("{}", serde_json::json!({ "tokens": tokens }));
            } else {
                for (p, t) in images.iter().zip(&tokens) {
                    println!("{} ({side}x{side} tokens):", p.display());
                    for row in t.chunks(side.max(1)) {
                        println!(
                            "  {}",
                            row.iter().map(|v| format!("{v:5}")).collect::<Vec<_>>().join("")
                        );
                    }
                }
            }
        }
        Command::Dvae {
            command:
                DvaeCommand::Train {
                    images,
                    eval,
                    out,
                    config,
                    steps,
                    time_limit,
                    resume,
                    device,
                },
        } => {
            let device = pick_device(&device)?;
            let mut cfg: flava_dvae::train::DvaeTrainConfig = match &config {
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
            flava_train::dvae_cmd::train_cmd(&images, &eval, &out, cfg, resume, &device)?;
        }
        Command::Dvae {
            command: DvaeCommand::Reconstruct { model, image, out },
        } => {
            flava_train::dvae_cmd::reconstruct_cmd(&model, &image, &out, &burn::prelude::Device::flex())?;
        }
        Command::Masks {
            grid,
            num_masking_patches,
            min_patches,
            max_patches,
            min_aspect,
            samples,
            seed,
            png,
            json,
        } => {
            let (height, width) = data_cmd::parse_grid(&grid)?;
            let cfg = BlockMaskConfig {
                height,
                width,
                num_masking_patches,
                min_num_patches: min_patches,
                max_num_patches: max_patches,
                min_aspect,
                max_aspect: None,
            };
            let masks = data_cmd::masks(cfg, samples, seed)?;
            if let Some(p) = &png {
                data_cmd::masks_png(&masks, height, width, p)?;
            }
            if json {
                let m: Vec<Vec<u8>> = masks.iter().map(|m| m.iter().map(|&b| b as u8).collect()).collect();
                println!("{}", serde_json::json!({ "masks": m }));
            } else {
                print!("{}", data_cmd::render_masks(&masks, height, width));
            }
        }
        Command::Data {
            command:
                DataCommand::Shards {
                    from,
                    out,
                    shard_size,
                    task,
                    limit,
                },
        } => {
            data_cmd::shards(
                &from,
                parse_task(&task)?,
                &out,
                shard_size,
                limit,
                &SourceOptions::default(),
            )?;
        }
        Command::Data {
            command: DataCommand::Inspect { shards },
        } => data_cmd::inspect_cmd(&shards)?,
        Command::Convert { input, output } => {
            let input = if input.is_dir() {
                input.join("pytorch_model.bin")
            } else {
                input
            };
            let input = find_weights(&input)?;
            let output = output.unwrap_or_else(|| input.with_file_name("model.safetensors"));
            eprintln!("reading {}", input.display());
            let (n, ignored) = convert_to_safetensors(&input, &output)?;
            println!("wrote {} tensors to {}", n, output.display());
            if !ignored.is_empty() {
                println!("dropped {} non-float buffers: {}", ignored.len(), ignored.join(", "));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
