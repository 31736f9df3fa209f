//! Forward passes of the image, text and multimodal encoders at the `tiny`, `small` and `full`
//! presets (random weights; numerics do not depend on them). Run: `cargo bench -p flava-benches`.

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use flava_fusion::{FlavaConfig, FlavaModel};

fn inputs(cfg: &FlavaConfig, batch: usize, seq: usize, device: &Device) -> (Tensor<4>, Tensor<2, Int>, Tensor<2, Int>) {
    let s = cfg.image_config.image_size;
    let px = Tensor::random([batch, 3, s, s], Distribution::Normal(0.0, 1.0), device);
    let ids = Tensor::<2>::random([batch, seq], Distribution::Uniform(1.0, 1000.0), device).int();
    let mask = Tensor::ones([batch, seq], device);
    (px, ids, mask)
}

fn bench_encoders(c: &mut Criterion) {
    // As the `flava` binary does (flava_train::alloc::tune_allocator).
    flava_train::alloc::tune_allocator();
    let device = Device::flex();
    for (name, cfg, batch, samples) in [
        ("tiny", FlavaConfig::tiny(), 8, 30),
        ("small", FlavaConfig::small(), 8, 20),
        ("full", FlavaConfig::full(), 1, 10),
    ] {
        let model = FlavaModel::new(&cfg, &device);
        let (px, ids, mask) = inputs(&cfg, batch, 32, &device);
        let mut g = c.benchmark_group(format!("encoders/{name}"));
        g.sample_size(samples);
        g.bench_function(BenchmarkId::new("image", batch), |b| {
            b.iter(|| {
                model
                    .image_model
                    .forward(px.clone(), None, false, false)
                    .last_hidden_state
                    .into_data()
            })
        });
        g.bench_function(BenchmarkId::new("text", batch), |b| {
            b.iter(|| {
                model
                    .text_model
                    .forward(ids.clone(), Some(&mask), None, false)
                    .last_hidden_state
                    .into_data()
            })
        });
        let img = model.image_model.forward(px.clone(), None, false, false);
        let txt = model.text_model.forward(ids.clone(), Some(&mask), None, false);
        g.bench_function(BenchmarkId::new("multimodal", batch), |b| {
            b.iter(|| model.fuse(&img, &txt, Some(&mask), false).last_hidden_state.into_data())
        });
        g.finish();
    }
}

criterion_group!(benches, bench_encoders);
criterion_main!(benches);
