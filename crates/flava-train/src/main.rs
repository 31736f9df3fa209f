//! The `flava` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flava_fusion::checkpoint::{convert_to_safetensors, find_weights};
use flava_train::{embed, pick_device};

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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Embed {
            model,
            images,
            texts,
            json,
            device,
            max_length,
        } => {
            let device = pick_device(&device)?;
            let out = embed::run(&model, &images, &texts, max_length, &device)?;
            if json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                print!("{}", embed::render(&out, &images, &texts));
            }
        }
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
