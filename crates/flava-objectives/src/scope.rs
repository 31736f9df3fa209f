//! Which rows and positions each loss counts, and what each mean loss divides by: one place for
//! a single batch and for the micro-batches of an accumulated (or data-parallel) batch.
//!
//! The rules (HF `FlavaForPreTraining`): ITM averages over every pair; MMM-image, MMM-text and
//! the contrastive rows count only ITM-positive pairs, or every pair when the batch has no
//! positive one; MIM and MLM average over their masked positions. For micro-batches the
//! "no positive pair" decision and every count are taken over the whole batch, so that the sum
//! of the micro-batch losses is the whole batch's mean.

use crate::batch::PretrainingBatch;

/// The host-side facts of one batch the loss scope depends on (serialisable: the ranks of a
/// distributed step exchange them).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchCounts {
    /// Samples.
    pub size: usize,
    /// The patch mask, flat `b·P + p`, and P; `None` without a mask.
    pub masked: Option<(Vec<bool>, usize)>,
    /// Flat MLM positions `b·L + l`.
    pub mlm_positions: Vec<usize>,
    /// Text length L (1 without text).
    pub seq: usize,
    /// ITM labels (1 = matching pair), if any.
    pub itm_labels: Option<Vec<usize>>,
}

impl BatchCounts {
    /// Reads the counts of `batch` (the patch mask comes to the host once, here).
    pub fn of(batch: &PretrainingBatch) -> Self {
        let seq = batch
            .input_ids_masked
            .as_ref()
            .or(batch.input_ids.as_ref())
            .map_or(1, |t| t.dims()[1]);
        Self {
            size: batch.batch_size(),
            masked: batch.masked_patches(),
            mlm_positions: batch.mlm.as_ref().map(|m| m.positions.clone()).unwrap_or_default(),
            seq,
            itm_labels: batch.itm_labels.clone(),
        }
    }
}

/// Denominators of the mean losses, counted over the whole (accumulated) batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Denominators {
    /// Masked patches (MIM).
    pub mim: usize,
    /// Masked tokens (MLM).
    pub mlm: usize,
    /// Pairs (ITM).
    pub itm: usize,
    /// Masked patches of the counted pairs (MMM-image).
    pub mmm_image: usize,
    /// Masked tokens of the counted pairs (MMM-text).
    pub mmm_text: usize,
}

/// What one batch (or micro-batch) counts: its rows for MMM and contrastive, and the
/// denominators of the whole batch it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LossScope {
    /// Local rows that count for MMM-image, MMM-text and the contrastive loss.
    pub rows: Vec<usize>,
    /// The whole batch's denominators.
    pub denominators: Denominators,
}

impl LossScope {
    /// The scope of a batch on its own.
    pub fn of(counts: &BatchCounts) -> Self {
        scopes(std::slice::from_ref(counts)).remove(0)
    }

    /// Whether local row `r` counts.
    pub fn counts_row(&self, r: usize) -> bool {
        self.rows.contains(&r)
    }
}

/// The scopes of the micro-batches of one batch, in order (one entry for an unsplit batch).
pub fn scopes(micro: &[BatchCounts]) -> Vec<LossScope> {
    // "No positive pair" is decided over the whole batch.
    let any_positive = micro
        .iter()
        .any(|c| c.itm_labels.as_ref().is_some_and(|l| l.iter().any(|&x| x != 0)));
    let rows: Vec<Vec<usize>> = micro
        .iter()
        .map(|c| match &c.itm_labels {
            Some(l) if any_positive => (0..l.len()).filter(|&i| l[i] != 0).collect(),
            _ => (0..c.size).collect(),
        })
        .collect();
    let mut den = Denominators::default();
    for (c, rows) in micro.iter().zip(&rows) {
        let counted = |b: usize| rows.binary_search(&b).is_ok();
        den.itm += c.size;
        den.mlm += c.mlm_positions.len();
        den.mmm_text += c.mlm_positions.iter().filter(|&&p| counted(p / c.seq.max(1))).count();
        if let Some((m, p)) = &c.masked {
            den.mim += m.iter().filter(|&&x| x).count();
            den.mmm_image += (0..m.len()).filter(|&j| m[j] && counted(j / (*p).max(1))).count();
        }
    }
    rows.into_iter()
        .map(|rows| LossScope {
            rows,
            denominators: den,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(labels: Option<Vec<usize>>, masked: Vec<bool>, mlm: Vec<usize>) -> BatchCounts {
        BatchCounts {
            size: 2,
            masked: Some((masked, 2)),
            mlm_positions: mlm,
            seq: 3,
            itm_labels: labels,
        }
    }

    #[test]
    fn one_batch_counts_positives_and_its_own_positions() {
        // Row 1 is an ITM negative: MMM counts row 0 only; MIM/MLM/ITM count everything.
        let c = counts(Some(vec![1, 0]), vec![true, false, true, true], vec![0, 2, 4]);
        let s = LossScope::of(&c);
        assert_eq!(s.rows, [0]);
        assert_eq!(
            s.denominators,
            Denominators {
                mim: 3,
                mlm: 3,
                itm: 2,
                mmm_image: 1,
                mmm_text: 2
            }
        );
        assert!(s.counts_row(0) && !s.counts_row(1));
        // No positive pair: every row counts.
        let none = LossScope::of(&counts(Some(vec![0, 0]), vec![true; 4], vec![5]));
        assert_eq!((none.rows.as_slice(), none.denominators.mmm_image), (&[0, 1][..], 4));
    }

    #[test]
    fn micro_batches_share_the_whole_batchs_counts() {
        // Micro-batch 0 has no positive pair but micro-batch 1 has one: the rule is the whole
        // batch's, so micro-batch 0 counts no row (it would count both on its own).
        let a = counts(Some(vec![0, 0]), vec![true, true, false, false], vec![1]);
        let b = counts(Some(vec![0, 1]), vec![false, true, true, false], vec![4]);
        let s = scopes(&[a.clone(), b]);
        assert_eq!((s[0].rows.as_slice(), s[1].rows.as_slice()), (&[][..], &[1][..]));
        let d = s[0].denominators;
        assert_eq!(d, s[1].denominators);
        assert_eq!((d.mim, d.mlm, d.itm, d.mmm_image, d.mmm_text), (4, 2, 4, 1, 1));
        assert_eq!(LossScope::of(&a).rows, [0, 1]);
    }
}
