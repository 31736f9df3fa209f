//! `flava finetune`: options (each overrides the same key of `--config`), the library run with
//! progress bars, and the validation result.

use std::path::PathBuf;

use flava_fusion::Tower;
use flava_train::finetune::{self, FinetuneConfig};
use flava_train::observer::ProgressBars;

/// `flava finetune` options; each overrides the same key of `--config`.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// TOML file with any fine-tuning option (keys as printed by --print-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// A FLAVA model directory (ours or HF's), a Hugging Face Hub id (`facebook/flava-full`), or
    /// `none` to train from scratch.
    #[arg(long)]
    init: Option<String>,
    /// Training data: synthetic:vqa, synthetic:classes, imagefolder:DIR, csv:FILE, jsonl:FILE,
    /// glue:TASK:FILE.tsv, memes:FILE.jsonl, snli-ve:FILE.jsonl:IMAGE_DIR,
    /// vqa:QUESTIONS.json:ANNOTATIONS.json:IMAGE_DIR.
    #[arg(long)]
    data: Option<String>,
    /// Validation data (same forms); default: 10% of the training data held out.
    #[arg(long)]
    val: Option<String>,
    /// Updates.
    #[arg(long)]
    steps: Option<usize>,
    /// Epochs (instead of --steps).
    #[arg(long)]
    epochs: Option<f64>,
    /// Examples per update.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Warmup steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// Freeze a tower: image, text or multimodal (repeatable).
    #[arg(long = "freeze")]
    freeze: Vec<Tower>,
    /// Validate every N steps (the best model is kept).
    #[arg(long)]
    val_every: Option<usize>,
    /// Answers kept for VQA.
    #[arg(long)]
    num_answers: Option<usize>,
    /// Text length in tokens.
    #[arg(long)]
    max_length: Option<usize>,
    /// Width of the head's hidden layer (0: a linear head).
    #[arg(long)]
    head_hidden: Option<usize>,
    /// Examples of a synthetic training set (validation gets a quarter).
    #[arg(long)]
    synthetic_len: Option<usize>,
    /// Train on the evaluation transform (no random crop or flip).
    #[arg(long)]
    no_augment: bool,
    /// Seed of data order and head initialisation.
    #[arg(long)]
    seed: Option<u64>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or wgpu.
    #[arg(long)]
    device: Option<String>,
}

/// Runs the command.
pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    let mut c = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => FinetuneConfig::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = a.$f.clone() { c.$f = v; })* };
    }
    set!(
        init,
        data,
        steps,
        batch_size,
        lr,
        warmup,
        val_every,
        num_answers,
        max_length,
        head_hidden,
        synthetic_len,
        seed,
        out,
        device
    );
    if a.val.is_some() {
        c.val = a.val.clone();
    }
    if a.epochs.is_some() {
        c.epochs = a.epochs;
    }
    if !a.freeze.is_empty() {
        c.freeze = a.freeze.clone();
    }
    if a.no_augment {
        c.augment = None;
    }
    c.resume = a.resume;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&c)?);
        return Ok(());
    }
    let s = finetune::run(&c, &mut ProgressBars::new())?;
    let b = &s.best;
    println!(
        "{} after {} steps: best validation {:?} {:.4} on {} examples ({} skipped); model in {}",
        b.task,
        s.steps,
        b.metric,
        b.score,
        b.n,
        b.skipped,
        s.model_dir.display()
    );
    println!("evaluation saved to {}", c.out.join("eval.json").display());
    Ok(())
}
