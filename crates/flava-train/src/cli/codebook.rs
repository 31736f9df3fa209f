//! `flava codebook`: the visual tokens of images.

use std::path::PathBuf;

use flava_train::{embed, pick_device};

/// Visual tokens of images from a codebook (or a full FLAVA directory's codebook).
#[derive(clap::Args)]
pub struct CodebookArgs {
    /// A codebook directory (`facebook/flava-image-codebook` layout) or a FLAVA directory, or
    /// a Hugging Face Hub id (`facebook/flava-image-codebook`).
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
}

/// Runs the command.
pub fn run(a: CodebookArgs) -> anyhow::Result<()> {
    let device = pick_device(&a.device)?;
    let (tokens, side) = embed::codebook_tokens(&a.model, &a.images, &device)?;
    if a.json {
        println!("{}", serde_json::json!({ "tokens": tokens }));
    } else {
        for (p, t) in a.images.iter().zip(&tokens) {
            println!("{} ({side}x{side} tokens):", p.display());
            for row in t.chunks(side.max(1)) {
                println!(
                    "  {}",
                    row.iter().map(|v| format!("{v:5}")).collect::<Vec<_>>().join("")
                );
            }
        }
    }
    Ok(())
}
