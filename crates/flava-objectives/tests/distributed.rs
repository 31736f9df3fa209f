//! Global contrastive across simulated ranks and contrastive-exact gradient accumulation, on the
//! HF fixture model. Both must reproduce the single-device, full-batch loss and gradients:
//! tolerance max |Δ| ≤ 1e-4 · max(1, max |g|), as for parity (only float summation order differs;
//! logits at scale 100 amplify it to ~2e-5).

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use common::{fixtures, slice_batch, Io};
use flava_objectives::checkpoint::load_pretraining;
use flava_objectives::{
    accumulate_gradients, broadcast_module, clamp_logit_scale, contrastive_loss, data_parallel_gradients,
    distributed_gradients, FlavaForPretraining, LocalGroup, PretrainingBatch, ProcessGroup, Replica, StepOptions,
};

const TOL: f32 = 1e-4;

/// Every float parameter's gradient, flattened, in visiting order.
struct Collect<'a> {
    grads: &'a GradientsParams,
    out: Vec<(String, Vec<f32>)>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let g = self
            .grads
            .get::<D>(param.id)
            .map(|t| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap())
            .unwrap_or_default();
        self.out.push((format!("{:?}", param.id), g));
    }
}

fn flat_grads(model: &FlavaForPretraining, grads: &GradientsParams) -> Vec<(String, Vec<f32>)> {
    let mut c = Collect { grads, out: vec![] };
    model.visit(&mut c);
    c.out
}

fn assert_same_grads(model: &FlavaForPretraining, got: &GradientsParams, want: &GradientsParams) {
    let (got, want) = (flat_grads(model, got), flat_grads(model, want));
    let mut compared = 0;
    let mut worst = 0f32;
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        if w.is_empty() {
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{name}: gradient here but none in the reference"
            );
            continue;
        }
        assert_eq!(g.len(), w.len(), "{name}: gradient missing");
        let scale = w.iter().fold(1f32, |m, x| m.max(x.abs()));
        let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(diff / scale);
        assert!(diff <= TOL * scale, "{name}: max |diff| {diff:e} (scale {scale})");
        compared += 1;
    }
    eprintln!("{compared} parameter gradients equal, worst relative diff {worst:.2e}");
    assert!(compared > 30, "only {compared} gradients compared");
}

fn load(io: &Io) -> (FlavaForPretraining, flava_dvae::ImageCodebook) {
    let l = load_pretraining(fixtures().join("pretraining"), false, &io.device).unwrap();
    (l.model, l.codebook.unwrap())
}

fn contrastive_only(model: FlavaForPretraining) -> FlavaForPretraining {
    let mut m = model;
    m.weights.itm = 0.0;
    m.weights.mmm_image = 0.0;
    m.weights.mmm_text = 0.0;
    m
}

#[test]
fn global_contrastive_over_simulated_ranks_equals_the_full_batch() {
    let io = Io::load();
    let (model, _) = load(&io);
    let model = contrastive_only(model);
    let mut full = io.batch("pairs");
    full.itm_labels = None;
    let b = full.batch_size();

    // Single device, whole batch.
    let out = model.forward(&full, &StepOptions::default()).unwrap();
    let want_loss = out.losses.global_contrastive.clone().unwrap().into_scalar::<f32>();
    let want = GradientsParams::from_grads(out.total.unwrap().backward(), &model);

    for world in [2, 4] {
        // Each rank embeds its shard; the gathered set is every rank's embeddings in one graph,
        // so gradients reach their owners as through the differentiable all-gather.
        let local = b / world;
        let shards: Vec<PretrainingBatch> = (0..world)
            .map(|r| slice_batch(&full, r * local, (r + 1) * local))
            .collect();
        let emb: Vec<(Tensor<2>, Tensor<2>)> = shards
            .iter()
            .map(|s| model.contrastive_embeddings(s).unwrap())
            .collect();
        let u_all = Tensor::cat(emb.iter().map(|e| e.0.clone()).collect(), 0);
        let v_all = Tensor::cat(emb.iter().map(|e| e.1.clone()).collect(), 0);
        let scale = clamp_logit_scale(model.flava.logit_scale.val());
        let rows: Vec<usize> = (0..local).collect();
        // DDP averages the ranks' gradients: differentiate the mean of the rank losses.
        let losses: Vec<Tensor<1>> = emb
            .iter()
            .enumerate()
            .map(|(r, (u, v))| {
                let out = contrastive_loss(
                    u.clone(),
                    v.clone(),
                    u_all.clone(),
                    v_all.clone(),
                    r * local,
                    scale.clone(),
                    &rows,
                );
                assert_eq!(out.logits_per_image.dims(), [local, b], "rows local, columns global");
                out.loss
            })
            .collect();
        let mean = losses.into_iter().reduce(|a, c| a + c).unwrap() / world as f64;
        let got_loss = mean.clone().into_scalar::<f32>();
        assert!(
            (got_loss - want_loss).abs() < 1e-5,
            "W={world}: loss {got_loss} vs {want_loss}"
        );
        let got = GradientsParams::from_grads(mean.backward(), &model);
        assert_same_grads(&model, &got, &want);
    }
}

/// The reference: total, losses and gradients of `full` as one batch.
#[allow(clippy::type_complexity)]
fn one_batch(
    model: &FlavaForPretraining,
    codebook: &flava_dvae::ImageCodebook,
    full: &PretrainingBatch,
) -> (f64, Vec<(&'static str, f64)>, GradientsParams) {
    let opts = StepOptions {
        codebook: Some(codebook),
        ..Default::default()
    };
    let out = model.forward(full, &opts).unwrap();
    let total = out.total.clone().unwrap().into_scalar::<f64>();
    let losses = out.losses.values();
    (
        total,
        losses,
        GradientsParams::from_grads(out.total.unwrap().backward(), model),
    )
}

/// Total and losses within 1e-4, gradients within `TOL` relative, of the one-batch reference.
fn assert_equals_one_batch(
    model: &FlavaForPretraining,
    step: &flava_objectives::AccumulatedStep,
    total: f64,
    losses: &[(&'static str, f64)],
    grads: &GradientsParams,
    what: &str,
) {
    assert!(
        (step.total - total).abs() < 1e-4,
        "{what}: total {} vs {total}",
        step.total
    );
    for (name, v) in losses {
        let got = step.losses.iter().find(|(n, _)| n == name).map(|x| x.1);
        assert!(
            got.is_some_and(|g| (g - v).abs() < 1e-4),
            "{what} {name}: {got:?} vs {v}"
        );
    }
    assert_same_grads(model, &step.grads, grads);
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    // The paired batch: ITM negative in row 2, padded caption in row 1, masks and MLM targets
    // of different counts per row, so the denominators matter.
    let full = io.batch("pairs");
    let (want_total, want_losses, want) = one_batch(&model, &codebook, &full);

    for k in [2, 4] {
        let per = full.batch_size() / k;
        let micro: Vec<PretrainingBatch> = (0..k).map(|i| slice_batch(&full, i * per, (i + 1) * per)).collect();
        let step = accumulate_gradients(&model, &micro, Some(&codebook)).unwrap();
        assert_equals_one_batch(&model, &step, want_total, &want_losses, &want, &format!("k={k}"));
    }
}

/// Data parallelism over two replicas (threads; both on the CPU here, as CI has no GPUs): four
/// micro-batches, two per replica, give the gradients and losses of the one big batch.
#[test]
fn data_parallel_replicas_equal_one_big_batch() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    let full = io.batch("pairs");
    let (want_total, want_losses, want) = one_batch(&model, &codebook, &full);
    let second = model.clone().fork(&io.device);
    let cb2 = codebook.clone();
    let replicas = [
        Replica {
            model: &model,
            codebook: Some(&codebook),
        },
        Replica {
            model: &second,
            codebook: Some(&cb2),
        },
    ];
    let per = full.batch_size() / 4;
    let micro: Vec<PretrainingBatch> = (0..4).map(|i| slice_batch(&full, i * per, (i + 1) * per)).collect();
    let step = data_parallel_gradients(&replicas, &micro).unwrap();
    assert_equals_one_batch(&model, &step, want_total, &want_losses, &want, "2 replicas");
}

/// Two ranks of a process group (threads of this process, through `LocalGroup`; MPI runs the
/// same code across processes): each rank holds two of the four micro-batches and its own model
/// copy, and both get the global batch's losses and gradients, equal to one big batch.
#[test]
fn ranks_of_a_process_group_equal_one_big_batch() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    let full = io.batch("pairs");
    let (want_total, want_losses, want) = one_batch(&model, &codebook, &full);
    let per = full.batch_size() / 4;
    let micro: Vec<PretrainingBatch> = (0..4).map(|i| slice_batch(&full, i * per, (i + 1) * per)).collect();
    let groups = LocalGroup::new(2);
    let copies = [model.clone(), model.clone().fork(&io.device)];
    let steps: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .zip(&copies)
            .enumerate()
            .map(|(r, (g, m))| {
                let (micro, codebook) = (&micro, &codebook);
                s.spawn(move || {
                    let replicas = [Replica {
                        model: m,
                        codebook: Some(codebook),
                    }];
                    distributed_gradients(g as &dyn ProcessGroup, &replicas, &micro[2 * r..2 * r + 2]).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, step) in steps.iter().enumerate() {
        assert_equals_one_batch(&model, step, want_total, &want_losses, &want, &format!("rank {r}"));
    }
    assert_eq!(steps[0].total, steps[1].total, "every rank has the same total");
}

/// Rank 0's weights reach every rank (here rank 1 starts from other weights), ids kept.
#[test]
fn broadcast_gives_every_rank_rank_zeros_weights() {
    let io = Io::load();
    let (model, _) = load(&io);
    let config = load_pretraining(fixtures().join("pretraining"), false, &io.device)
        .unwrap()
        .config;
    let other = FlavaForPretraining::new(&config, &io.device);
    let groups = LocalGroup::new(2);
    let got: Vec<FlavaForPretraining> = std::thread::scope(|s| {
        let hs: Vec<_> = [model.clone(), other.clone()]
            .into_iter()
            .zip(groups.clone())
            .map(|(m, g)| s.spawn(move || broadcast_module(&g as &dyn ProcessGroup, m, 0).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let flat = |m: &FlavaForPretraining| {
        let w = m.flava.logit_scale.val().into_data().try_to_vec::<f32>().unwrap();
        let q = m.flava.image_model.encoder.layer[0]
            .attention
            .attention
            .query
            .weight
            .val();
        (w, q.into_data().try_to_vec::<f32>().unwrap())
    };
    assert_eq!(flat(&got[1]), flat(&model), "rank 1 holds rank 0's weights");
    assert_ne!(flat(&other).1, flat(&model).1, "rank 1 started elsewhere");
    assert_eq!(
        got[1].flava.logit_scale.id, other.flava.logit_scale.id,
        "parameter ids are the rank's own"
    );
    assert!(
        got[1].flava.logit_scale.val().is_require_grad(),
        "weights stay trainable"
    );
}

#[test]
fn accumulation_of_image_only_micro_batches_equals_one_big_batch() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    let full = io.batch("images");
    let (want_total, _, want) = one_batch(&model, &codebook, &full);
    let micro: Vec<PretrainingBatch> = (0..3).map(|i| slice_batch(&full, i, i + 1)).collect();
    let step = accumulate_gradients(&model, &micro, Some(&codebook)).unwrap();
    assert!((step.total - want_total).abs() < 1e-4, "{} vs {want_total}", step.total);
    assert_same_grads(&model, &step.grads, &want);
}

/// The clamp after each optimizer step must leave `logit_scale` a trainable parameter (mapping
/// it to a detached tensor once froze it at its initial value for whole training runs).
#[test]
fn logit_scale_stays_trainable_after_the_clamp() {
    let io = Io::load();
    let (model, _) = load(&io);
    let model = contrastive_only(model).clamp_logit_scale_param();
    let scale = model.flava.logit_scale.val().into_scalar::<f32>();
    assert!((scale - 4.6052).abs() < 1e-6, "clamped to {scale}");
    let mut batch = io.batch("pairs");
    batch.itm_labels = None;
    let out = model.forward(&batch, &StepOptions::default()).unwrap();
    let grads = GradientsParams::from_grads(out.total.unwrap().backward(), &model);
    let g = grads
        .get::<1>(model.flava.logit_scale.id)
        .expect("logit_scale has a gradient after the clamp")
        .into_scalar::<f32>();
    assert!(g.abs() > 1e-6, "logit_scale gradient {g}");
}
