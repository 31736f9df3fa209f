//! The pretraining heads and losses at the `small` preset, forward and backward, each on
//! hidden states of a batch of 32 (40% masked patches, 15% masked tokens); and a whole paired-batch
//! pretraining step (both towers twice, fusion, five heads, backward) at `tiny` and `small`; the
//! whole training step (forward, backward, AdamW) on paired, image-only and text-only batches at
//! `tiny` and `small`; the paired pretraining forward at `full` (batch 8, no autograd).
//! Run: `cargo bench -p flava-benches --bench objectives`.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use flava_benches::inputs::{positions, pretraining_batch, BenchTask, SEQ};
use flava_fusion::FlavaConfig;
use flava_objectives::contrastive::{clamp_logit_scale, contrastive_loss};
use flava_objectives::losses::{cross_entropy, gather_positions};
use flava_objectives::{FlavaForPretraining, StepOptions};

const BATCH: usize = 32;

fn states(b: usize, s: usize, d: usize, device: &Device) -> Tensor<3> {
    Tensor::random([b, s, d], Distribution::Normal(0.0, 1.0), device).require_grad()
}

fn bench_losses(c: &mut Criterion) {
    // As the `flava` binary does (flava_train::alloc::tune_allocator).
    flava_train::alloc::tune_allocator();
    let device = Device::flex().autodiff();
    let cfg = FlavaConfig::small();
    let model = FlavaForPretraining::new(&cfg, &device);
    let (h, grid) = (
        cfg.hidden_size,
        cfg.image_config.image_size / cfg.image_config.patch_size,
    );
    let patches = grid * grid;
    let img_pos = positions(BATCH * patches, 2); // 50% of the patches
    let txt_pos = positions(BATCH * SEQ, 7); // ~15%
    let img_tgt: Vec<usize> = img_pos.iter().map(|p| p % cfg.image_config.vocab_size).collect();
    let txt_tgt: Vec<usize> = txt_pos.iter().map(|p| p % cfg.text_config.vocab_size).collect();
    let mut g = c.benchmark_group("losses/small");
    g.sample_size(20);
    for (name, head, n_pos, tgt) in [
        ("mim", &model.mim_head, &img_pos, &img_tgt),
        ("mmm_image", &model.mmm_image_head, &img_pos, &img_tgt),
        ("mlm", &model.mlm_head, &txt_pos, &txt_tgt),
        ("mmm_text", &model.mmm_text_head, &txt_pos, &txt_tgt),
    ] {
        let seq = if tgt.len() == img_tgt.len() { patches } else { SEQ };
        let x = states(BATCH, seq, h, &device);
        g.bench_function(BenchmarkId::new(name, BATCH), |b| {
            b.iter(|| {
                let loss = cross_entropy(head.forward(gather_positions(x.clone(), n_pos)), tgt);
                loss.backward()
            })
        });
    }
    let mm = states(BATCH, 2 + patches + SEQ, h, &device);
    let labels: Vec<usize> = (0..BATCH).map(|i| usize::from(i % 5 != 0)).collect();
    g.bench_function(BenchmarkId::new("itm", BATCH), |b| {
        b.iter(|| cross_entropy(model.itm_head.forward(mm.clone()), &labels).backward())
    });
    let u: Tensor<2> =
        Tensor::random([BATCH, cfg.projection_dim], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let v: Tensor<2> =
        Tensor::random([BATCH, cfg.projection_dim], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let rows: Vec<usize> = (0..BATCH).collect();
    g.bench_function(BenchmarkId::new("global_contrastive", BATCH), |b| {
        b.iter(|| {
            let (un, vn) = (
                flava_fusion::l2_normalize(u.clone()),
                flava_fusion::l2_normalize(v.clone()),
            );
            let scale = clamp_logit_scale(model.flava.logit_scale.val());
            contrastive_loss(un.clone(), vn.clone(), un, vn, 0, scale, &rows)
                .loss
                .backward()
        })
    });
    g.finish();
}

fn bench_step(c: &mut Criterion) {
    // As the `flava` binary does (flava_train::alloc::tune_allocator).
    flava_train::alloc::tune_allocator();
    let device = Device::flex().autodiff();
    for (name, cfg, samples) in [("tiny", FlavaConfig::tiny(), 20), ("small", FlavaConfig::small(), 10)] {
        let model = FlavaForPretraining::new(&cfg, &device);
        let batch = pretraining_batch(&cfg, BATCH, BenchTask::Pairs, &device);
        let mut g = c.benchmark_group(format!("pretraining_step/{name}"));
        g.sample_size(samples);
        g.bench_function(BenchmarkId::new("pairs_forward_backward", BATCH), |b| {
            b.iter(|| {
                let out = model.forward(&batch, &StepOptions::default()).unwrap();
                out.total.unwrap().backward()
            })
        });
        // The whole step as the trainer runs it: `Trainer::step` (forward, backward, the training
        // optimizer with its groups, decay and clipping).
        for (task, label) in [
            (BenchTask::Pairs, "pairs_step"),
            (BenchTask::Images, "images_step"),
            (BenchTask::Text, "text_step"),
        ] {
            let batch = pretraining_batch(&cfg, BATCH, task, &device);
            let mut trainer = flava_benches::step::training_step(FlavaForPretraining::new(&cfg, &device), &device);
            g.bench_function(BenchmarkId::new(label, BATCH), |b| {
                b.iter(|| trainer.step(&batch, &mut flava_train::observer::Quiet).unwrap())
            });
        }
        g.finish();
    }
    // `full`: the paired pretraining forward only (no autograd), few samples.
    let cfg = FlavaConfig::full();
    let inference = Device::flex();
    let model = FlavaForPretraining::new(&cfg, &inference);
    let batch = pretraining_batch(&cfg, 8, BenchTask::Pairs, &inference);
    let mut g = c.benchmark_group("pretraining_step/full");
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("pairs_forward", 8), |b| {
        b.iter(|| {
            model
                .forward(&batch, &StepOptions::default())
                .unwrap()
                .total
                .unwrap()
                .into_data()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_losses, bench_step);
criterion_main!(benches);
