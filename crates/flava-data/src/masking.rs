//! BEiT block-wise image masking (HF `FlavaMaskingGenerator`, BEiT `masking_generator.py`).
//!
//! Blocks of patches are added until the budget is spent or no attempt succeeds: per block, up to
//! 10 attempts draw a target area uniformly in `[min_num_patches, budget left]` and a log-uniform
//! aspect ratio, round the sides half-to-even (Python's `round`), keep the block only if both
//! sides are strictly smaller than the grid, place it with inclusive bounds, and accept it when the
//! newly masked patches are between 1 and the budget left. The same mask serves the ViT patch grid
//! and the codebook token grid (row-major, `p = row · width + col`).

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Parameters of the block masking generator; defaults are FLAVA's (14×14, 75, 16, 0.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockMaskConfig {
    /// Grid rows.
    pub height: usize,
    /// Grid columns.
    pub width: usize,
    /// Most patches masked in total (HF `total_mask_patches`).
    pub num_masking_patches: usize,
    /// Smallest block area (HF `mask_group_min_patches`).
    pub min_num_patches: usize,
    /// Largest block area; `None` = `num_masking_patches`.
    pub max_num_patches: Option<usize>,
    /// Smallest aspect ratio of a block.
    pub min_aspect: f64,
    /// Largest aspect ratio; `None` = `1 / min_aspect`.
    pub max_aspect: Option<f64>,
}

impl Default for BlockMaskConfig {
    fn default() -> Self {
        Self {
            height: 14,
            width: 14,
            num_masking_patches: 75,
            min_num_patches: 16,
            max_num_patches: None,
            min_aspect: 0.3,
            max_aspect: None,
        }
    }
}

/// Why a block-mask configuration is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaskConfigError {
    /// A grid with no cell.
    #[error("the mask grid must be at least 1×1")]
    EmptyGrid,
    /// More patches to mask than the grid holds.
    #[error("num_masking_patches {patches} exceeds the {height}×{width} grid")]
    OverGrid {
        /// `num_masking_patches`.
        patches: usize,
        /// Grid rows.
        height: usize,
        /// Grid columns.
        width: usize,
    },
    /// `min_aspect` not a positive number.
    #[error("min_aspect must be positive")]
    MinAspect,
    /// `max_aspect` below `min_aspect`.
    #[error("max_aspect {max} must be at least min_aspect {min}")]
    MaxAspect {
        /// The maximum (given or 1 / min).
        max: f64,
        /// The minimum.
        min: f64,
    },
    /// A block minimum that no block can meet, so every mask would be empty.
    #[error("min_num_patches {min} must be between 1 and the number of masking patches {budget} (and max_num_patches {max}); otherwise every mask is empty")]
    MinPatches {
        /// `min_num_patches`.
        min: usize,
        /// `num_masking_patches`.
        budget: usize,
        /// `max_num_patches` (or the budget).
        max: usize,
    },
}

/// Draws BEiT block masks.
#[derive(Debug, Clone)]
pub struct BlockMaskGenerator {
    cfg: BlockMaskConfig,
    max_patches: usize,
    log_aspect: (f64, f64),
}

impl BlockMaskGenerator {
    /// Validates the configuration.
    pub fn new(cfg: BlockMaskConfig) -> Result<Self, MaskConfigError> {
        if cfg.height == 0 || cfg.width == 0 {
            return Err(MaskConfigError::EmptyGrid);
        }
        if cfg.num_masking_patches > cfg.height * cfg.width {
            return Err(MaskConfigError::OverGrid {
                patches: cfg.num_masking_patches,
                height: cfg.height,
                width: cfg.width,
            });
        }
        if !(cfg.min_aspect.is_finite() && cfg.min_aspect > 0.0) {
            return Err(MaskConfigError::MinAspect);
        }
        let max_aspect = cfg.max_aspect.unwrap_or(1.0 / cfg.min_aspect);
        if !(max_aspect.is_finite() && max_aspect >= cfg.min_aspect) {
            return Err(MaskConfigError::MaxAspect {
                max: max_aspect,
                min: cfg.min_aspect,
            });
        }
        let max_patches = cfg.max_num_patches.unwrap_or(cfg.num_masking_patches);
        // A block smaller than `min_num_patches` is never drawn: with a minimum above the budget
        // (or the grid) every mask would come out empty.
        if cfg.num_masking_patches > 0
            && (cfg.min_num_patches == 0 || cfg.min_num_patches > cfg.num_masking_patches.min(max_patches))
        {
            return Err(MaskConfigError::MinPatches {
                min: cfg.min_num_patches,
                budget: cfg.num_masking_patches,
                max: max_patches,
            });
        }
        Ok(Self {
            log_aspect: (cfg.min_aspect.ln(), max_aspect.ln()),
            max_patches,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BlockMaskConfig {
        &self.cfg
    }

    /// Number of grid cells.
    pub fn len(&self) -> usize {
        self.cfg.height * self.cfg.width
    }

    /// Whether the grid is empty (never: `new` rejects it).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One mask, row-major, `true` = masked. At most `num_masking_patches` are masked.
    pub fn generate(&self, rng: &mut impl Rng) -> Vec<bool> {
        let mut mask = vec![false; self.len()];
        let mut count = 0;
        while count < self.cfg.num_masking_patches {
            let max_mask = (self.cfg.num_masking_patches - count).min(self.max_patches);
            let delta = self.add_block(&mut mask, max_mask, rng);
            if delta == 0 {
                break;
            }
            count += delta;
        }
        mask
    }

    fn add_block(&self, mask: &mut [bool], max_mask: usize, rng: &mut impl Rng) -> usize {
        let (gh, gw) = (self.cfg.height, self.cfg.width);
        let mut delta = 0;
        for _ in 0..10 {
            // Python's random.uniform(a, b) = a + (b - a) * random(), valid for b < a too.
            let lo = self.cfg.min_num_patches as f64;
            let target_area = lo + (max_mask as f64 - lo) * rng.random::<f64>();
            let (la, lb) = self.log_aspect;
            let aspect = (la + (lb - la) * rng.random::<f64>()).exp();
            let h = (target_area * aspect).sqrt().round_ties_even() as usize;
            let w = (target_area / aspect).sqrt().round_ties_even() as usize;
            if w < gw && h < gh {
                let top = rng.random_range(0..=gh - h);
                let left = rng.random_range(0..=gw - w);
                let already: usize = (top..top + h)
                    .map(|r| (left..left + w).filter(|&c| mask[r * gw + c]).count())
                    .sum();
                let new = h * w - already;
                if 0 < new && new <= max_mask {
                    for r in top..top + h {
                        for c in left..left + w {
                            if !mask[r * gw + c] {
                                mask[r * gw + c] = true;
                                delta += 1;
                            }
                        }
                    }
                }
                if delta > 0 {
                    break;
                }
            }
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Figures measured on transformers' `FlavaMaskingGenerator` (20,000 draws, 14×14/75/16):
    /// mean 74.47 masked patches, exactly 75 in 66.6% of draws.
    #[test]
    fn statistics_match_the_reference() {
        let g = BlockMaskGenerator::new(BlockMaskConfig::default()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let n = 10_000;
        let counts: Vec<usize> = (0..n)
            .map(|_| g.generate(&mut rng).iter().filter(|&&m| m).count())
            .collect();
        let mean = counts.iter().sum::<usize>() as f64 / n as f64;
        let full = counts.iter().filter(|&&c| c == 75).count() as f64 / n as f64;
        assert!((mean - 74.47).abs() <= 0.1, "mean {mean}");
        assert!((full - 0.666).abs() <= 0.02, "share of exactly 75: {full}");
        assert!(counts.iter().all(|&c| c <= 75));
    }

    #[test]
    fn rejects_impossible_budgets() {
        let cfg = BlockMaskConfig {
            height: 4,
            width: 4,
            num_masking_patches: 17,
            ..Default::default()
        };
        assert!(BlockMaskGenerator::new(cfg).is_err());
    }
}
