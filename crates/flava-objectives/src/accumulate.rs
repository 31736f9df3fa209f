//! Gradient accumulation that keeps every contrastive negative: the contrastive features of all
//! k micro-batches are computed first without autograd, then each micro-batch is re-run with
//! autograd, its own features live and the others' from the cache. Each re-run differentiates
//! the contrastive loss of the whole accumulated batch through its own rows only, so the summed
//! gradients equal those of one batch k times larger; mean losses use the big batch's counts.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use crate::pretraining::{
    CachedFeatures, Contrastive, Denominators, FlavaForPretraining, ObjectiveError, PretrainingBatch, StepOptions,
};
use flava_dvae::ImageCodebook;

/// The result of [`accumulate_gradients`].
#[derive(Debug)]
pub struct AccumulatedStep {
    /// Summed gradients of all micro-batches (= gradients of the big batch).
    pub grads: GradientsParams,
    /// Each present loss of the big batch (name, value).
    pub losses: Vec<(&'static str, f64)>,
    /// The big batch's weighted total.
    pub total: f64,
}

/// Host-side counts of one micro-batch.
struct Counts {
    size: usize,
    masked: Vec<bool>,
    patches: usize,
    mlm: Vec<usize>,
    seq: usize,
}

/// Runs `micro` (micro-batches of one task) and returns the gradients of their union as one batch.
/// `codebook`: frozen, on a device without autodiff, for MIM targets.
pub fn accumulate_gradients(
    model: &FlavaForPretraining,
    micro: &[PretrainingBatch],
    codebook: Option<&ImageCodebook>,
) -> Result<AccumulatedStep, ObjectiveError> {
    if micro.is_empty() {
        return Err(ObjectiveError::EmptyBatch);
    }
    let paired = micro[0].is_paired();
    let counts: Vec<Counts> = micro
        .iter()
        .map(|m| {
            let (masked, patches) = m.masked_patches().unwrap_or_default();
            let seq = m
                .input_ids_masked
                .as_ref()
                .or(m.input_ids.as_ref())
                .map_or(1, |t| t.dims()[1]);
            Counts {
                size: m.batch_size(),
                masked,
                patches,
                mlm: m.mlm.as_ref().map(|t| t.positions.clone()).unwrap_or_default(),
                seq,
            }
        })
        .collect();
    // "No positive pair" is decided over the big batch, as for one batch.
    let any_positive = micro
        .iter()
        .any(|m| m.itm_labels.as_ref().is_some_and(|l| l.iter().any(|&x| x != 0)));
    let rows: Vec<Vec<usize>> = micro
        .iter()
        .map(|m| match &m.itm_labels {
            Some(l) if any_positive => (0..l.len()).filter(|&i| l[i] != 0).collect(),
            _ => (0..m.batch_size()).collect(),
        })
        .collect();
    let in_rows = |i: usize, b: usize| rows[i].contains(&b);
    let mut den = Denominators {
        itm: Some(counts.iter().map(|c| c.size).sum()),
        ..Default::default()
    };
    let masked_total: usize = counts.iter().map(|c| c.masked.iter().filter(|&&x| x).count()).sum();
    let mlm_total: usize = counts.iter().map(|c| c.mlm.len()).sum();
    if paired {
        den.mmm_image = Some(
            counts
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (0..c.masked.len())
                        .filter(|&j| c.masked[j] && in_rows(i, j / c.patches.max(1)))
                        .count()
                })
                .sum(),
        );
        den.mmm_text = Some(
            counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.mlm.iter().filter(|&&p| in_rows(i, p / c.seq)).count())
                .sum(),
        );
    } else {
        den.mim = Some(masked_total);
        den.mlm = Some(mlm_total);
    }

    // Contrastive features of every micro-batch, without autograd.
    let cache = if paired && model.weights.global_contrastive > 0.0 {
        let valid = model.valid();
        let (mut us, mut vs) = (Vec::new(), Vec::new());
        for m in micro {
            let inner = PretrainingBatch {
                pixel_values: m.pixel_values.clone().map(|t| t.without_autodiff()),
                input_ids: m.input_ids.clone().map(|t| t.without_autodiff()),
                input_ids_masked: m.input_ids_masked.clone().map(|t| t.without_autodiff()),
                attention_mask: m.attention_mask.clone().map(|t| t.without_autodiff()),
                token_type_ids: m.token_type_ids.clone().map(|t| t.without_autodiff()),
                ..Default::default()
            };
            let (u, v) = valid.contrastive_embeddings(&inner);
            us.push(u);
            vs.push(v);
        }
        let mut offset = 0;
        let mut global_rows = Vec::new();
        for (i, c) in counts.iter().enumerate() {
            global_rows.extend(rows[i].iter().map(|r| offset + r));
            offset += c.size;
        }
        Some((Tensor::cat(us, 0), Tensor::cat(vs, 0), global_rows))
    } else {
        None
    };

    let mut acc = GradientsAccumulator::new();
    let mut sums: Vec<(&'static str, f64)> = Vec::new();
    let mut total = 0.0;
    let mut offset = 0;
    for (i, m) in micro.iter().enumerate() {
        let cached = cache.as_ref().map(|(u, v, r)| CachedFeatures {
            image: u.clone(),
            text: v.clone(),
            offset,
            rows: r.clone(),
            live_scale: i == 0,
        });
        let opts = StepOptions {
            codebook,
            contrastive: cached.as_ref().map_or(Contrastive::Local, Contrastive::Cached),
            denominators: den,
            positive_rows: Some(rows[i].clone()),
        };
        let out = model.forward(m, &opts)?;
        offset += counts[i].size;
        for (name, v) in out.losses.values() {
            // The contrastive value is the big batch's in every micro-batch: count it once.
            let add = if name == "global_contrastive" && i > 0 { 0.0 } else { v };
            match sums.iter_mut().find(|(n, _)| *n == name) {
                Some(s) => s.1 += add,
                None => sums.push((name, add)),
            }
        }
        if let Some(t) = out.total {
            let grads = GradientsParams::from_grads(t.backward(), model);
            acc.accumulate(model, grads);
        }
    }
    for (name, v) in &sums {
        total += v * model.weights.get(name);
    }
    Ok(AccumulatedStep {
        grads: acc.grads(),
        losses: sums,
        total,
    })
}
