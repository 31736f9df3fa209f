//! dVAE: tokenization throughput of the full-size FLAVA codebook at 112 px (images/s, inference on
//! a non-autodiff device), and one training step of the default small dVAE (batch 16, 64 px).

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flava_dvae::train::{Dvae, DvaeTrainConfig};
use flava_dvae::{FlavaImageCodebookConfig, ImageCodebook};

fn bench_dvae(c: &mut Criterion) {
    // As the `flava` binary does (flava_vit::kernels::tune_allocator).
    flava_vit::kernels::tune_allocator();
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
    let mut model = Dvae::new(&cfg, &ad);
    let mut optim = AdamWConfig::new().with_epsilon(1e-8).init();
    let x = Tensor::<4>::random([16, 3, 64, 64], Distribution::Uniform(0.1, 0.9), &ad);
    g.throughput(Throughput::Elements(16));
    g.bench_function("train_step_default_dvae_64px_batch16", |b| {
        b.iter(|| {
            let logits = model.encoder.forward(x.clone());
            let soft = softmax(logits / 0.5, 1);
            let pred = sigmoid(model.decoder.forward(soft));
            let loss = (pred - (x.clone() - 0.1) / 0.8).square().mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-4, model.clone(), grads);
        })
    });
    g.finish();
    let _ = model.valid();
}

criterion_group!(benches, bench_dvae);
criterion_main!(benches);
