//! Gradient accumulation that keeps every contrastive negative: the contrastive features of all
//! k micro-batches are computed first without autograd, then each micro-batch is re-run with
//! autograd, its own features live and the others' from the cache. Each re-run differentiates
//! the contrastive loss of the whole accumulated batch through its own rows only, so the summed
//! gradients equal those of one batch k times larger; mean losses use the big batch's counts.
//!
//! Data parallelism is the same computation spread over devices: [`data_parallel_gradients`]
//! runs the micro-batches on model replicas, one thread per device, exchanges the contrastive
//! features between them (the global contrastive loss sees every device's negatives), and sums
//! the gradients on the first device. On CUDA the threads overlap their devices' work; on a
//! single CPU the same path runs with replicas that share the device (which is how it is tested).
//!
//! Across processes, [`distributed_gradients`] is the same computation with the micro-batches
//! spread over the ranks of a [`ProcessGroup`]: the batch counts (loss denominators, positive
//! rows), the contrastive features and the loss values are all-gathered, each rank
//! differentiates through its own rows, and the gradients are all-reduced, so every rank holds
//! the gradients of the whole global batch.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use crate::batch::PretrainingBatch;
use crate::collective::{all_gather_json, all_reduce_gradients, bytes_f32, f32_bytes, ProcessGroup, SingleProcess};
use crate::pretraining::{CachedFeatures, Contrastive, FlavaForPretraining, LossKind, ObjectiveError, StepOptions};
use crate::scope::{scopes, BatchCounts};
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

/// One model replica for data parallelism: the model on one device (same parameter ids as the
/// others, e.g. `model.clone().fork(&device)`) and the frozen codebook on that device's inner
/// (non-autodiff) device.
#[derive(Clone, Copy)]
pub struct Replica<'a> {
    /// The model on this device.
    pub model: &'a FlavaForPretraining,
    /// The frozen codebook for MIM targets, on this device without autodiff.
    pub codebook: Option<&'a ImageCodebook>,
}

/// Runs `micro` (micro-batches of one task) and returns the gradients of their union as one batch.
/// `codebook`: frozen, on a device without autodiff, for MIM targets.
pub fn accumulate_gradients(
    model: &FlavaForPretraining,
    micro: &[PretrainingBatch],
    codebook: Option<&ImageCodebook>,
) -> Result<AccumulatedStep, ObjectiveError> {
    data_parallel_gradients(&[Replica { model, codebook }], micro)
}

/// The losses and summed gradients of one replica's micro-batches.
type ReplicaResult = Result<(Vec<(usize, Vec<(&'static str, f64)>)>, Option<GradientsParams>), ObjectiveError>;

/// Data-parallel [`accumulate_gradients`]: micro-batch `i` runs on `replicas[i % n]` and must
/// live on its device. Returns the gradients of the union of all micro-batches, as one batch,
/// on the first replica's device (for its optimizer step; then fork the updated model to the
/// other devices again).
pub fn data_parallel_gradients(
    replicas: &[Replica<'_>],
    micro: &[PretrainingBatch],
) -> Result<AccumulatedStep, ObjectiveError> {
    distributed_gradients(&SingleProcess, replicas, micro)
}

/// [`data_parallel_gradients`] over the ranks of `group`: `micro` are this rank's micro-batches,
/// and the global batch is every rank's micro-batches in rank order (rank 0's first). Every
/// rank must call it at the same step with the same task. Returns, on every rank, the losses
/// of the global batch and the gradients of all ranks summed (so every rank can take the same
/// optimizer step). With one rank it is [`data_parallel_gradients`].
pub fn distributed_gradients(
    group: &dyn ProcessGroup,
    replicas: &[Replica<'_>],
    micro: &[PretrainingBatch],
) -> Result<AccumulatedStep, ObjectiveError> {
    if micro.is_empty() || replicas.is_empty() {
        return Err(ObjectiveError::EmptyBatch);
    }
    let n_rep = replicas.len();
    let model = replicas[0].model;
    let assigned = |r: usize| (r..micro.len()).step_by(n_rep);
    let paired = micro[0].is_paired();
    // Rows and denominators over the whole global batch (crate::scope, as for one batch).
    let local_counts: Vec<BatchCounts> = micro.iter().map(BatchCounts::of).collect();
    let (counts, first) = if group.world() > 1 {
        let per_rank = all_gather_json(group, &local_counts)?;
        let first: usize = per_rank[..group.rank()].iter().map(Vec::len).sum();
        (per_rank.into_iter().flatten().collect::<Vec<_>>(), first)
    } else {
        (local_counts, 0)
    };
    let scope = scopes(&counts);

    // Contrastive features of every micro-batch, without autograd, each on its replica.
    let cache = if paired && model.weights.global_contrastive > 0.0 {
        let per_replica = on_replicas(replicas, |r, rep| {
            let valid = rep.model.valid();
            assigned(r)
                .map(|i| {
                    let m = &micro[i];
                    let inner = PretrainingBatch {
                        pixel_values: m.pixel_values.clone().map(|t| t.without_autodiff()),
                        input_ids: m.input_ids.clone().map(|t| t.without_autodiff()),
                        input_ids_masked: m.input_ids_masked.clone().map(|t| t.without_autodiff()),
                        attention_mask: m.attention_mask.clone().map(|t| t.without_autodiff()),
                        token_type_ids: m.token_type_ids.clone().map(|t| t.without_autodiff()),
                        ..Default::default()
                    };
                    valid.contrastive_embeddings(&inner).map(|(u, v)| (i, u, v))
                })
                .collect::<Vec<_>>()
        });
        let mut feats: Vec<_> = per_replica.into_iter().flatten().collect::<Result<_, _>>()?;
        feats.sort_by_key(|f: &(usize, Tensor<2>, Tensor<2>)| f.0);
        // All on the first replica's device; each replica's forward moves the cache to its own.
        let device = feats[0].1.device();
        let (us, vs): (Vec<_>, Vec<_>) = feats
            .into_iter()
            .map(|(_, u, v)| (u.to_device(&device), v.to_device(&device)))
            .unzip();
        let (u, v) = (Tensor::cat(us, 0), Tensor::cat(vs, 0));
        // Across ranks: every rank's features, rank order, as host floats.
        let (u, v) = if group.world() > 1 {
            (gather_rows(group, u)?, gather_rows(group, v)?)
        } else {
            (u, v)
        };
        let mut offset = 0;
        let mut global_rows = Vec::new();
        for (c, sc) in counts.iter().zip(&scope) {
            global_rows.extend(sc.rows.iter().map(|r| offset + r));
            offset += c.size;
        }
        Some((u, v, global_rows))
    } else {
        None
    };
    let offsets: Vec<usize> = counts
        .iter()
        .scan(0, |o, c| {
            let here = *o;
            *o += c.size;
            Some(here)
        })
        .collect();

    // Forward and backward of every micro-batch on its replica; gradients summed per replica.
    let results: Vec<ReplicaResult> = on_replicas(replicas, |r, rep| {
        let mut acc = GradientsAccumulator::new();
        let mut any = false;
        let mut losses = Vec::new();
        for i in assigned(r) {
            let m = &micro[i];
            // Its index in the global batch.
            let g = first + i;
            let cached = cache.as_ref().map(|(u, v, rw)| CachedFeatures {
                image: u.clone(),
                text: v.clone(),
                offset: offsets[g],
                rows: rw.clone(),
                live_scale: g == 0,
            });
            let opts = StepOptions {
                codebook: rep.codebook,
                contrastive: cached.as_ref().map_or(Contrastive::Local, Contrastive::Cached),
                scope: Some(scope[g].clone()),
            };
            let out = rep.model.forward(m, &opts)?;
            losses.push((g, out.losses.values()));
            if let Some(t) = out.total {
                let grads = GradientsParams::from_grads(t.backward(), rep.model);
                acc.accumulate(rep.model, grads);
                any = true;
            }
        }
        Ok((losses, any.then(|| acc.grads())))
    });

    // Sum on the first replica's device, losses in micro-batch order.
    let main_device = micro[0]
        .pixel_values
        .as_ref()
        .map(|t| t.device())
        .or_else(|| micro[0].input_ids.as_ref().map(|t| t.device()));
    let mut acc = GradientsAccumulator::new();
    let mut per_micro = Vec::new();
    for (r, res) in results.into_iter().enumerate() {
        let (losses, grads) = res?;
        per_micro.extend(losses);
        if let Some(g) = grads {
            let g = match (&main_device, r) {
                (Some(d), r) if r > 0 => g.to_device(d, model),
                _ => g,
            };
            acc.accumulate(model, g);
        }
    }
    let grads = all_reduce_gradients(group, model, acc.grads())?;
    if group.world() > 1 {
        // Every rank's micro-batch losses (names travel as strings).
        let named: Vec<(usize, Vec<(String, f64)>)> = per_micro
            .iter()
            .map(|(i, l)| (*i, l.iter().map(|(n, v)| (n.to_string(), *v)).collect()))
            .collect();
        per_micro = Vec::new();
        for (i, l) in all_gather_json(group, &named)?.into_iter().flatten() {
            let l = l
                .into_iter()
                .map(|(n, v)| {
                    LossKind::from_name(&n)
                        .map(|k| (k.name(), v))
                        .ok_or_else(|| ObjectiveError::Shape(format!("unknown loss `{n}`")))
                })
                .collect::<Result<_, _>>()?;
            per_micro.push((i, l));
        }
    }
    per_micro.sort_by_key(|(i, _)| *i);
    let mut sums: Vec<(&'static str, f64)> = Vec::new();
    let mut total = 0.0;
    for (i, values) in per_micro {
        for (name, v) in values {
            // The contrastive value is the big batch's in every micro-batch: count it once.
            let add = if name == "global_contrastive" && i > 0 { 0.0 } else { v };
            match sums.iter_mut().find(|(n, _)| *n == name) {
                Some(s) => s.1 += add,
                None => sums.push((name, add)),
            }
        }
    }
    for (name, v) in &sums {
        let kind = LossKind::from_name(name).ok_or_else(|| ObjectiveError::Shape(format!("unknown loss `{name}`")))?;
        total += v * model.weights.get(kind);
    }
    Ok(AccumulatedStep {
        grads,
        losses: sums,
        total,
    })
}

/// `[n, d]` rows of every rank, rank order, on `t`'s device (host floats on the wire).
fn gather_rows(group: &dyn ProcessGroup, t: Tensor<2>) -> Result<Tensor<2>, ObjectiveError> {
    let [_, d] = t.dims();
    let device = t.device();
    let host = t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
    let all: Vec<f32> = group
        .all_gather(&f32_bytes(&host))?
        .iter()
        .flat_map(|b| bytes_f32(b))
        .collect();
    let n = all.len() / d.max(1);
    Ok(Tensor::from_data(TensorData::new(all, [n, d]), &device))
}

/// Runs `f(r, replica)` for every replica, one thread each when there are several.
fn on_replicas<'a, T: Send>(replicas: &[Replica<'a>], f: impl Fn(usize, Replica<'a>) -> T + Sync) -> Vec<T> {
    if replicas.len() == 1 {
        return vec![f(0, replicas[0])];
    }
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(r, &rep)| scope.spawn(move || f(r, rep)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}
