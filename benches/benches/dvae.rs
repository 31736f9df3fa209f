//! dVAE: tokenization throughput of the full-size FLAVA codebook at 112 px (images/s, inference on
//! a non-autodiff device), and one training step of the default small dVAE (batch 16, 64 px).

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flava_dvae::dvae::{Dvae, DvaeTrainConfig};
use flava_dvae::{FlavaImageCodebookConfig, ImageCodebook};
use flava_train::dvae::{optimizer_config, DvaeBatch, DvaeObjective};
use flava_train::trainer::{Trainer, TrainerConfig};

fn bench_dvae(c: &mut Criterion) {
    // As the `flava` binary does (flava_train::alloc::tune_allocator).
    flava_train::alloc::tune_allocator();
    let device = Device::flex();
    let mut g = c.benchmark_group("dvae");
    let full = ImageCodebook::new(&FlavaImageCodebookConfig::default(), &device);
    let x = Tensor::<4>::random([8, 3, 112, 112], Distribution::Uniform(0.1, 0.9), &device);
    g.throughput(Throughput::Elements(8));
    g.sample_size(10);
    g.bench_function("tokenize_full_codebook_112px_batch8", |b| {
        b.iter(|| full.tokens(x.clone()).into_data())
    });

    let cfg = DvaeTrainConfig {
        batch_size: 16,
        ..Default::default()
    };
    let ad = device.clone().autodiff();
    // The training step of `flava dvae train`: the dVAE objective on the workspace's Trainer.
    let mut trainer = Trainer::new(
        Dvae::new(&cfg, &ad),
        DvaeObjective::new(&cfg, 0.0),
        TrainerConfig {
            optimizer: optimizer_config(&cfg),
            steps: cfg.steps,
            max_nonfinite: usize::MAX,
        },
    );
    let batch = DvaeBatch {
        x: Tensor::<4>::random([16, 3, 64, 64], Distribution::Uniform(0.1, 0.9), &ad),
    };
    g.throughput(Throughput::Elements(16));
    g.bench_function("train_step_default_dvae_64px_batch16", |b| {
        b.iter(|| {
            trainer
                .step(&batch, &mut flava_train::observer::Quiet)
                .expect("a dVAE step")
        })
    });
    g.finish();
}

criterion_group!(benches, bench_dvae);
criterion_main!(benches);
