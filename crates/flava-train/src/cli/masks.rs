//! `flava masks`: BEiT block masks drawn, to see and tune the masking.

use std::path::PathBuf;

use flava_data::masking::BlockMaskConfig;
use flava_train::data_cmd;

/// Draw BEiT block masks, to see and tune the masking.
#[derive(clap::Args)]
pub struct MasksArgs {
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
    /// Replace an existing --png file.
    #[arg(long)]
    force: bool,
    /// Print `{"masks": [[0|1; rows*cols]; samples]}` (row-major).
    #[arg(long)]
    json: bool,
}

/// Runs the command.
pub fn run(a: MasksArgs) -> anyhow::Result<()> {
    let (height, width) = data_cmd::parse_grid(&a.grid)?;
    let cfg = BlockMaskConfig {
        height,
        width,
        num_masking_patches: a.num_masking_patches,
        min_num_patches: a.min_patches,
        max_num_patches: a.max_patches,
        min_aspect: a.min_aspect,
        max_aspect: None,
    };
    let masks = data_cmd::masks(cfg, a.samples, a.seed)?;
    if let Some(p) = &a.png {
        data_cmd::masks_png(&masks, height, width, p, a.force)?;
    }
    if a.json {
        let m: Vec<Vec<u8>> = masks.iter().map(|m| m.iter().map(|&b| b as u8).collect()).collect();
        println!("{}", serde_json::json!({ "masks": m }));
    } else {
        print!("{}", data_cmd::render_masks(&masks, height, width));
    }
    Ok(())
}
