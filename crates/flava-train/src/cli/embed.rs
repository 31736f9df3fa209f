//! `flava embed`: image and text features and their contrastive logits (and ITM probabilities).

use std::path::PathBuf;

use flava_train::{embed, pick_device};

/// Image and text features, and their contrastive logits, from an HF-format FLAVA directory.
#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Model directory: config.json, model.safetensors or pytorch_model.bin, tokenizer.json
    /// (or vocab.txt), preprocessor_config.json; or a Hugging Face Hub id (`facebook/flava-full`,
    /// `org/name@revision`), taken from the HF cache or downloaded into it.
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
}

/// Runs the command.
pub fn run(a: EmbedArgs) -> anyhow::Result<()> {
    let device = pick_device(&a.device)?;
    let out = embed::run(&a.model, &a.images, &a.texts, a.max_length, a.itm, &device)?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print!("{}", embed::render(&out, &a.images, &a.texts));
    }
    Ok(())
}
