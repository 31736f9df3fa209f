//! `flava eval zero-shot` and `flava eval retrieval` on a model directory (ours or HF's).

use std::path::PathBuf;

use clap::Subcommand;
use flava_train::{eval_cmd, pick_device};

/// The evaluations.
#[derive(Subcommand)]
pub enum EvalCommand {
    /// Zero-shot classification: class names from the labels (ImageFolder folder names, or
    /// `synthetic:classes`), prompts from the templates, top-1 and top-5 accuracy.
    ZeroShot {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Labelled images: an ImageFolder directory or `synthetic:classes`.
        #[arg(long)]
        data: String,
        /// Prompt template with `{}` for the class (repeatable; several are averaged). Default "a
        /// photo of a {}.", or for `synthetic:classes` captions of every shape ("a big {} circle", ...).
        #[arg(long = "template")]
        templates: Vec<String>,
        /// Most images evaluated.
        #[arg(long, default_value_t = 50_000)]
        max_images: usize,
        /// Print `{"top1", "top5", "n_images", "classes"}`.
        #[arg(long)]
        json: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Image-text retrieval, R@1/5/10 both ways.
    Retrieval {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Image-caption pairs: shards, CSV/TSV, coco:ANN.json:DIR, synthetic:heldout.
        #[arg(long)]
        pairs: String,
        /// Most pairs evaluated.
        #[arg(long, default_value_t = 5_000)]
        max_pairs: usize,
        /// Print `{"image_to_text": {...}, "text_to_image": {...}, "n_images", "n_texts"}`.
        #[arg(long)]
        json: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
}

/// Runs the command.
pub fn run(c: EvalCommand) -> anyhow::Result<()> {
    match c {
        EvalCommand::ZeroShot {
            model,
            data,
            templates,
            max_images,
            json,
            device,
        } => {
            let device = pick_device(&device)?;
            let z = eval_cmd::zero_shot(&model, &data, &templates, max_images, &device)?;
            if json {
                println!("{}", serde_json::to_string(&z)?);
            } else {
                println!(
                    "zero-shot on {} images, {} classes: top-1 {:.2}%, top-5 {:.2}% (chance {:.2}%)",
                    z.n_images,
                    z.classes.len(),
                    100.0 * z.top1,
                    100.0 * z.top5,
                    100.0 / z.classes.len() as f64
                );
            }
        }
        EvalCommand::Retrieval {
            model,
            pairs,
            max_pairs,
            json,
            device,
        } => {
            let device = pick_device(&device)?;
            let r = eval_cmd::retrieval(&model, &pairs, max_pairs, &device)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("retrieval on {} images, {} texts:", r.n_images, r.n_texts);
                for (name, x) in [("image->text", r.image_to_text), ("text->image", r.text_to_image)] {
                    println!(
                        "  {name}: R@1 {:.2}%  R@5 {:.2}%  R@10 {:.2}%",
                        100.0 * x.r1,
                        100.0 * x.r5,
                        100.0 * x.r10
                    );
                }
            }
        }
    }
    Ok(())
}
