//! BERT masked-language-model masking (HF `DataCollatorForLanguageModeling`, optionally whole-word
//! as `DataCollatorForWholeWordMask`).
//!
//! Of the non-special tokens (CLS, SEP, PAD and other special ids never chosen), each is chosen with
//! probability `probability` (15%); of those, 80% become `[MASK]`, 10% a uniformly random id and 10%
//! stay unchanged. Targets are returned as positions + original ids (no −100 arrays). A sequence
//! with at least one candidate always gets at least one target. With whole-word masking, WordPiece
//! continuations (`##…`) are chosen together with the token that starts their word.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Probabilities of MLM masking; defaults are BERT's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MlmConfig {
    /// Share of candidate tokens (or words) chosen as targets.
    pub probability: f64,
    /// Of the chosen, the share replaced by `[MASK]`.
    pub mask_replace: f64,
    /// Of the chosen, the share replaced by a random token.
    pub random_replace: f64,
    /// Choose whole words (a `##` piece joins the token before it).
    pub whole_word: bool,
}

impl Default for MlmConfig {
    fn default() -> Self {
        Self {
            probability: 0.15,
            mask_replace: 0.8,
            random_replace: 0.1,
            whole_word: false,
        }
    }
}

/// A masked sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlmMasked {
    /// The input with chosen tokens replaced.
    pub input_ids: Vec<u32>,
    /// Chosen positions, increasing.
    pub positions: Vec<usize>,
    /// The original ids at `positions`.
    pub targets: Vec<u32>,
}

/// Masks one sequence.
///
/// `special[i]` marks tokens that may never be chosen (CLS, SEP, PAD…); `continuation[i]` marks
/// WordPiece continuations (used with `whole_word`). `mask_id` is `[MASK]`, random replacements are
/// drawn from `0..vocab_size`.
pub fn mask_tokens(
    ids: &[u32],
    special: &[bool],
    continuation: &[bool],
    mask_id: u32,
    vocab_size: u32,
    cfg: &MlmConfig,
    rng: &mut impl Rng,
) -> MlmMasked {
    // Units: single candidate tokens, or whole words when asked.
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, &sp) in special.iter().enumerate().take(ids.len()) {
        if sp {
            continue;
        }
        let joins = cfg.whole_word && continuation.get(i).copied().unwrap_or(false);
        match units.last_mut() {
            Some(u) if joins && u.last() == Some(&(i.wrapping_sub(1))) => u.push(i),
            _ => units.push(vec![i]),
        }
    }
    let mut chosen: Vec<usize> = units
        .iter()
        .filter(|_| rng.random::<f64>() < cfg.probability)
        .flatten()
        .copied()
        .collect();
    if chosen.is_empty() && !units.is_empty() {
        chosen = units[rng.random_range(0..units.len())].clone();
    }
    chosen.sort_unstable();
    let mut input_ids = ids.to_vec();
    let targets = chosen.iter().map(|&p| ids[p]).collect();
    for &p in &chosen {
        let r: f64 = rng.random();
        if r < cfg.mask_replace {
            input_ids[p] = mask_id;
        } else if r < cfg.mask_replace + cfg.random_replace {
            input_ids[p] = rng.random_range(0..vocab_size.max(1));
        }
    }
    MlmMasked {
        input_ids,
        positions: chosen,
        targets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn seq(n: usize) -> (Vec<u32>, Vec<bool>) {
        // [CLS] w… [SEP] [PAD]…
        let mut ids = vec![101];
        ids.extend((0..n as u32).map(|i| 1000 + i));
        ids.push(102);
        ids.extend([0, 0, 0]);
        let special = ids.iter().map(|&i| i == 101 || i == 102 || i == 0).collect();
        (ids, special)
    }

    #[test]
    fn proportions_follow_bert() {
        let (ids, special) = seq(60);
        let cfg = MlmConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut chosen, mut masked, mut random, mut kept, mut total) = (0usize, 0usize, 0usize, 0usize, 0usize);
        for _ in 0..4000 {
            let m = mask_tokens(&ids, &special, &[], 103, 30522, &cfg, &mut rng);
            total += 60;
            chosen += m.positions.len();
            for (&p, &t) in m.positions.iter().zip(&m.targets) {
                assert!(!special[p], "special token chosen");
                assert_eq!(ids[p], t);
                match m.input_ids[p] {
                    103 => masked += 1,
                    x if x == t => kept += 1,
                    _ => random += 1,
                }
            }
            for (p, (&got, &orig)) in m.input_ids.iter().zip(&ids).enumerate() {
                if !m.positions.contains(&p) {
                    assert_eq!(got, orig);
                }
            }
        }
        let share = chosen as f64 / total as f64;
        assert!((share - 0.15).abs() < 0.005, "chosen share {share}");
        let c = chosen as f64;
        assert!((masked as f64 / c - 0.8).abs() < 0.01, "mask {}", masked as f64 / c);
        // A random id can equal the original (1 in 30522): "kept" absorbs those.
        assert!((random as f64 / c - 0.1).abs() < 0.01 && (kept as f64 / c - 0.1).abs() < 0.01);
    }

    #[test]
    fn short_sequences_always_get_a_target_and_empty_ones_none() {
        let (ids, special) = seq(1);
        let cfg = MlmConfig {
            probability: 0.0,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let m = mask_tokens(&ids, &special, &[], 103, 100, &cfg, &mut rng);
        assert_eq!((m.positions.clone(), m.targets.clone()), (vec![1], vec![1000]));
        let (ids, special) = seq(0);
        let m = mask_tokens(&ids, &special, &[], 103, 100, &cfg, &mut rng);
        assert!(m.positions.is_empty());
    }

    #[test]
    fn whole_words_are_masked_together() {
        // [CLS] un ##believ ##able cat [SEP]
        let ids = [101, 10, 11, 12, 13, 102];
        let special = [true, false, false, false, false, true];
        let cont = [false, false, true, true, false, false];
        let cfg = MlmConfig {
            whole_word: true,
            probability: 0.5,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let m = mask_tokens(&ids, &special, &cont, 103, 100, &cfg, &mut rng);
            let word: Vec<bool> = (1..4).map(|p| m.positions.contains(&p)).collect();
            assert!(word.iter().all(|&b| b) || word.iter().all(|&b| !b), "{:?}", m.positions);
        }
    }
}
