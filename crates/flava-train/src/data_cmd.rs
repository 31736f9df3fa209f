//! `flava masks` and `flava data shards|inspect`.

use std::path::Path;

use anyhow::Context;
use flava_data::masking::{BlockMaskConfig, BlockMaskGenerator};
use flava_data::shards::{write_shards, ShardReport};
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;
use image::{Rgb, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Parses `ROWSxCOLS` (e.g. `14x14`).
pub fn parse_grid(s: &str) -> anyhow::Result<(usize, usize)> {
    let (h, w) = s.split_once(['x', 'X']).context("grid must look like 14x14")?;
    let (h, w): (usize, usize) = (
        h.trim().parse().context("grid rows")?,
        w.trim().parse().context("grid columns")?,
    );
    flava_vit::limits::current().check_dim("grid cells", (h as u64).saturating_mul(w as u64))?;
    Ok((h, w))
}

/// Most masks `flava masks` draws in one call.
pub const MAX_MASK_SAMPLES: usize = 100_000;

/// Draws `samples` masks; returns them row-major.
pub fn masks(cfg: BlockMaskConfig, samples: usize, seed: u64) -> anyhow::Result<Vec<Vec<bool>>> {
    if samples > MAX_MASK_SAMPLES {
        anyhow::bail!("--samples {samples}: at most {MAX_MASK_SAMPLES} masks at a time");
    }
    let g = BlockMaskGenerator::new(cfg)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok((0..samples).map(|_| g.generate(&mut rng)).collect())
}

/// Text rendering: `#` masked, `.` visible, masks side by side.
pub fn render_masks(masks: &[Vec<bool>], h: usize, w: usize) -> String {
    let mut s = String::new();
    for r in 0..h {
        let row: Vec<String> = masks
            .iter()
            .map(|m| (0..w).map(|c| if m[r * w + c] { '#' } else { '.' }).collect())
            .collect();
        s += &row.join("   ");
        s.push('\n');
    }
    let counts: Vec<String> = masks
        .iter()
        .map(|m| m.iter().filter(|&&b| b).count().to_string())
        .collect();
    s += &format!("masked patches: {}\n", counts.join(", "));
    s
}

/// Draws masks as a PNG, 12 px a cell, masks side by side.
pub fn masks_png(masks: &[Vec<bool>], h: usize, w: usize, out: &Path, force: bool) -> anyhow::Result<()> {
    let cell = 12u32;
    let gap = 2 * cell;
    let width = masks.len() as u32 * (w as u32 * cell + gap);
    let img = RgbImage::from_fn(width.max(1), h as u32 * cell, |x, y| {
        let k = (x / (w as u32 * cell + gap)) as usize;
        let xx = x % (w as u32 * cell + gap);
        if xx >= w as u32 * cell || k >= masks.len() {
            return Rgb([255, 255, 255]);
        }
        let (r, c) = ((y / cell) as usize, (xx / cell) as usize);
        let border = x % cell == 0 || y % cell == 0;
        match (masks[k][r * w + c], border) {
            (_, true) => Rgb([200, 200, 200]),
            (true, _) => Rgb([30, 30, 30]),
            (false, _) => Rgb([240, 240, 240]),
        }
    });
    crate::save_image_file(&img, out, force)
}

/// `flava data shards`.
pub fn shards(
    from: &str,
    task: Task,
    out: &Path,
    shard_size: usize,
    limit: Option<u64>,
    force: bool,
    opts: &SourceOptions,
) -> anyhow::Result<ShardReport> {
    if shard_size == 0 {
        anyhow::bail!("--shard-size must be at least 1");
    }
    let existing: Vec<std::path::PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar") || p.to_string_lossy().ends_with(".tar.tmp"))
        .collect();
    if !existing.is_empty() {
        if !force {
            anyhow::bail!(
                "{} already holds {} shard(s); pass --force to replace them, or choose another --out",
                out.display(),
                existing.len()
            );
        }
        for p in &existing {
            std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let opts = SourceOptions {
        shuffle: false,
        shuffle_buffer: 0,
        ..opts.clone()
    };
    let mut src = open_source(from, task, &opts)?;
    let bar = indicatif::ProgressBar::new(limit.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} samples {per_sec} {elapsed_precise} {msg}")
            .expect("template"),
    );
    let report = write_shards(src.as_mut(), out, shard_size, limit, |n| bar.set_position(n))?;
    bar.finish_and_clear();
    Ok(report)
}
