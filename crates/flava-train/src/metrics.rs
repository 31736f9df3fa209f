//! Task metrics, computed on the host from predictions: accuracy, top-k, mean per-class recall,
//! VQA accuracy, F1 and Matthews correlation of a binary task, AUROC, Pearson correlation.

/// Top-1 accuracy of `pred` against `gold`.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    let hit = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    hit as f64 / gold.len().max(1) as f64
}

/// Share of rows whose gold class is among the `k` highest scores; `scores` row-major [n, c].
pub fn top_k(scores: &[f32], classes: usize, gold: &[usize], k: usize) -> f64 {
    let hit = gold
        .iter()
        .enumerate()
        .filter(|&(i, &g)| {
            let row = &scores[i * classes..(i + 1) * classes];
            row.iter().filter(|&&s| s > row[g]).count() < k
        })
        .count();
    hit as f64 / gold.len().max(1) as f64
}

/// The mean over classes (present in `gold`) of the share of their rows predicted right.
pub fn mean_per_class_recall(pred: &[usize], gold: &[usize], classes: usize) -> f64 {
    let mut hit = vec![0usize; classes];
    let mut n = vec![0usize; classes];
    for (&p, &g) in pred.iter().zip(gold) {
        if g < classes {
            n[g] += 1;
            hit[g] += usize::from(p == g);
        }
    }
    let present: Vec<f64> = (0..classes)
        .filter(|&c| n[c] > 0)
        .map(|c| hit[c] as f64 / n[c] as f64)
        .collect();
    present.iter().sum::<f64>() / present.len().max(1) as f64
}

/// VQA accuracy: the mean over rows of the soft score of the predicted answer
/// (`scores[i]` = the row's soft score per answer, as [`flava_data::tasks::vqa_score`] gives).
pub fn vqa_accuracy(pred: &[usize], scores: &[Vec<f32>]) -> f64 {
    let total: f64 = pred
        .iter()
        .zip(scores)
        .map(|(&p, s)| s.get(p).copied().unwrap_or(0.0) as f64)
        .sum();
    total / scores.len().max(1) as f64
}

/// Counts of a binary task (class 1 positive): (tp, fp, tn, fn).
fn confusion(pred: &[usize], gold: &[usize]) -> (f64, f64, f64, f64) {
    let (mut tp, mut fp, mut tn, mut fnn) = (0.0, 0.0, 0.0, 0.0);
    for (&p, &g) in pred.iter().zip(gold) {
        match (p == 1, g == 1) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, false) => tn += 1.0,
            (false, true) => fnn += 1.0,
        }
    }
    (tp, fp, tn, fnn)
}

/// F1 of the positive class (1): `2·tp / (2·tp + fp + fn)`; 0 without positives.
pub fn f1(pred: &[usize], gold: &[usize]) -> f64 {
    let (tp, fp, _, fnn) = confusion(pred, gold);
    if tp == 0.0 {
        return 0.0;
    }
    2.0 * tp / (2.0 * tp + fp + fnn)
}

/// Matthews correlation of a binary task; 0 when a margin is empty.
pub fn matthews(pred: &[usize], gold: &[usize]) -> f64 {
    let (tp, fp, tn, fnn) = confusion(pred, gold);
    let den = ((tp + fp) * (tp + fnn) * (tn + fp) * (tn + fnn)).sqrt();
    if den == 0.0 {
        return 0.0;
    }
    (tp * tn - fp * fnn) / den
}

/// Area under the ROC curve of `score` (higher = positive) against `gold` (1 positive): the
/// probability that a positive outranks a negative, ties counting half (Mann-Whitney).
pub fn auroc(score: &[f32], gold: &[usize]) -> f64 {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
    // Average ranks (1-based) over ties.
    let mut rank = vec![0.0f64; score.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && score[idx[j + 1]] == score[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            rank[k] = r;
        }
        i = j + 1;
    }
    let pos = gold.iter().filter(|&&g| g == 1).count() as f64;
    let neg = gold.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    let sum: f64 = gold.iter().zip(&rank).filter(|(g, _)| **g == 1).map(|(_, r)| r).sum();
    (sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Pearson correlation; 0 when either side is constant.
pub fn pearson(x: &[f32], y: &[f32]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    if n == 0.0 {
        return 0.0;
    }
    let mx = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let my = y.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (a as f64 - mx, b as f64 - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx * syy).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_hand_computed_cases() {
        let gold = [1, 0, 1, 1, 0];
        let pred = [1, 1, 0, 1, 0];
        // tp 2, fp 1, tn 1, fn 1.
        assert!((accuracy(&pred, &gold) - 0.6).abs() < 1e-12);
        assert!((f1(&pred, &gold) - 4.0 / 6.0).abs() < 1e-12);
        assert!((matthews(&pred, &gold) - (2.0 - 1.0) / (3.0f64 * 3.0 * 2.0 * 2.0).sqrt()).abs() < 1e-12);
        // Recall: class 0 1/2, class 1 2/3 → mean 7/12.
        assert!((mean_per_class_recall(&pred, &gold, 2) - 7.0 / 12.0).abs() < 1e-12);
        // AUROC: positives 0.9, 0.4, 0.8; negatives 0.3, 0.4 → pairs won 3 + 2 + 0.5·1 of 6 … :
        // (0.9 > both) 2, (0.8 > both) 2, (0.4 vs 0.3) 1 and (0.4 vs 0.4) 0.5 → 5.5 / 6.
        let score = [0.9, 0.3, 0.4, 0.8, 0.4];
        assert!((auroc(&score, &gold) - 5.5 / 6.0).abs() < 1e-12);
        assert_eq!(auroc(&[0.1, 0.2], &[1, 1]), 0.5);
        // Pearson of a line is 1, of its mirror −1; a constant side gives 0.
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
        // x = [1,2,3,4], y = [1,3,2,4]: r = 0.8.
        assert!((pearson(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]) - 0.8).abs() < 1e-9);
        // Top-k: row 0 gold 2 is 2nd, row 1 gold 0 is 3rd.
        let s = [0.1, 0.5, 0.3, 0.2, 0.9, 0.4];
        assert_eq!(top_k(&s, 3, &[2, 0], 1), 0.0);
        assert_eq!(top_k(&s, 3, &[2, 0], 2), 0.5);
        assert_eq!(top_k(&s, 3, &[2, 0], 3), 1.0);
        // VQA accuracy: the predicted answer's soft score.
        let soft = vec![vec![1.0, 0.0], vec![0.3, 0.6]];
        assert!((vqa_accuracy(&[0, 0], &soft) - 0.65).abs() < 1e-6);
    }
}
