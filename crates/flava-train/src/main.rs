//! The `flava` command line: parses options and hands each command to its file in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flava",
    version,
    about = "FLAVA in Rust: pretrain, evaluate, embed, tokenize images, prepare data, convert checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Override a reader's resource limit, e.g. `--reader-limit max_image_pixels=200000000`
    /// (repeatable; names as in the `[limits]` section of `flava pretrain --print-config`).
    #[arg(long = "reader-limit", global = true, value_name = "NAME=VALUE")]
    limits: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain FLAVA (all six losses, round-robin over image, text and paired data). With no
    /// arguments: a tiny model on the built-in synthetic data, ending with an evaluation.
    Pretrain(Box<cli::pretrain::PretrainArgs>),
    /// Fine-tune FLAVA with a task head (VQA, GLUE, image classification, CSV/JSONL tasks),
    /// validating and keeping the best model.
    Finetune(Box<cli::finetune::FinetuneArgs>),
    /// Evaluate a model directory (ours or an HF FLAVA one).
    Eval {
        #[command(subcommand)]
        command: cli::eval::EvalCommand,
    },
    /// Image and text features, and their contrastive logits, from an HF-format FLAVA directory.
    Embed(cli::embed::EmbedArgs),
    /// Visual tokens of images from a codebook (or a full FLAVA directory's codebook).
    Codebook(cli::codebook::CodebookArgs),
    /// Train a dVAE image tokenizer, or reconstruct an image with one.
    Dvae {
        #[command(subcommand)]
        command: cli::dvae::DvaeCommand,
    },
    /// Draw BEiT block masks, to see and tune the masking.
    Masks(cli::masks::MasksArgs),
    /// Data utilities: write any source as WebDataset shards, inspect shards.
    Data {
        #[command(subcommand)]
        command: cli::data::DataCommand,
    },
    /// Convert a PyTorch checkpoint (`pytorch_model.bin`, `.pt`) to `model.safetensors`,
    /// without executing any pickled code.
    Convert(cli::convert::ConvertArgs),
    /// Write a run's report: one self-contained HTML page (curves, evaluation, examples).
    Report(cli::report::ReportArgs),
}

fn run(c: Cli) -> anyhow::Result<()> {
    flava_vit::limits::set(cli::parse_limits(Default::default(), &c.limits)?);
    match c.command {
        Command::Pretrain(args) => cli::pretrain::run(*args, &c.limits),
        Command::Finetune(a) => cli::finetune::run(*a),
        Command::Eval { command } => cli::eval::run(command),
        Command::Embed(a) => cli::embed::run(a),
        Command::Codebook(a) => cli::codebook::run(a),
        Command::Dvae { command } => cli::dvae::run(command),
        Command::Masks(a) => cli::masks::run(a),
        Command::Data { command } => cli::data::run(command),
        Command::Convert(a) => cli::convert::run(a),
        Command::Report(a) => cli::report::run(a),
    }
}

fn main() -> ExitCode {
    // Library warnings (skipped records, ...) on stderr as `warning: ...`; RUST_LOG overrides.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(
        "error,flava_vit=warn,flava_text=warn,flava_fusion=warn,flava_dvae=warn,flava_objectives=warn,flava_data=warn,flava_train=info",
    ))
        .format(|f, r| {
            use std::io::Write;
            let level = match r.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warning",
                _ => "note",
            };
            writeln!(f, "{level}: {}", r.args())
        })
        .init();
    // Reuse freed memory across training steps instead of mmap/munmap per large tensor.
    flava_train::alloc::tune_allocator();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
