//! `flava convert`: a PyTorch checkpoint to `model.safetensors`, without executing pickled code.

use std::path::PathBuf;

use flava_fusion::checkpoint::{convert_to_safetensors, find_weights};

/// Convert a PyTorch checkpoint (`pytorch_model.bin`, `.pt`) to `model.safetensors`,
/// without executing any pickled code.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// A `.bin`/`.pt` file, or a directory holding `pytorch_model.bin`.
    input: PathBuf,
    /// Output file (default: `model.safetensors` beside the input).
    output: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
}

/// Runs the command.
pub fn run(a: ConvertArgs) -> anyhow::Result<()> {
    let input = if a.input.is_dir() {
        a.input.join("pytorch_model.bin")
    } else {
        a.input
    };
    let input = find_weights(&input)?;
    let output = a.output.unwrap_or_else(|| input.with_file_name("model.safetensors"));
    let same = output
        .canonicalize()
        .ok()
        .is_some_and(|o| input.canonicalize().ok() == Some(o));
    if same || output == input {
        anyhow::bail!(
            "the output {} is the input: choose another output file",
            output.display()
        );
    }
    if output.exists() && !a.force {
        anyhow::bail!("{} exists; pass --force to replace it", output.display());
    }
    eprintln!("reading {}", input.display());
    let (n, ignored) = convert_to_safetensors(&input, &output)?;
    println!("wrote {} tensors to {}", n, output.display());
    if !ignored.is_empty() {
        println!("dropped {} non-float buffers: {}", ignored.len(), ignored.join(", "));
    }
    Ok(())
}
