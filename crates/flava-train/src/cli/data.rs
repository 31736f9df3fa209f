//! `flava data shards` and `flava data inspect`.

use std::path::PathBuf;

use clap::Subcommand;
use flava_data::spec::SourceOptions;
use flava_data::task::Task;
use flava_train::data_cmd;

/// The data commands.
#[derive(Subcommand)]
pub enum DataCommand {
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
        /// Write into an --out that already holds shards (they are deleted first).
        #[arg(long)]
        force: bool,
    },
    /// Count samples and members of shards (`data/{000..009}.tar`) and show the first sample.
    Inspect {
        /// Shard file or brace pattern.
        shards: String,
    },
}

/// Runs the command.
pub fn run(c: DataCommand) -> anyhow::Result<()> {
    match c {
        DataCommand::Shards {
            from,
            out,
            shard_size,
            task,
            limit,
            force,
        } => {
            let task = task.parse::<Task>()?;
            let report = data_cmd::shards(&from, task, &out, shard_size, limit, force, &SourceOptions::default())?;
            println!(
                "wrote {} samples in {} shards to {} ({} skipped)",
                report.samples,
                report.shards.len(),
                out.display(),
                report.skipped
            );
        }
        DataCommand::Inspect { shards } => {
            let (summaries, first) = flava_data::shards::inspect(&shards)?;
            let mut total = 0;
            for s in &summaries {
                println!(
                    "{}: {} samples ({} with image, {} with text, {} with label), {} skipped",
                    s.path.display(),
                    s.samples,
                    s.with_image,
                    s.with_text,
                    s.with_label,
                    s.skipped
                );
                total += s.samples;
            }
            println!("total: {total} samples in {} shards", summaries.len());
            if let Some(f) = first {
                println!("first sample: {f}");
            }
        }
    }
    Ok(())
}
