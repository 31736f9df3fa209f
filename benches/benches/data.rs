//! The data pipeline: decode a 256-pixel JPEG, two-way crop to 224 and 112, normalise, BEiT mask,
//! collate into tensors (images/s, 2 worker threads); and the masking generator alone (masks/s).

use burn::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flava_data::batch::{BatchBuilder, BatchConfig};
use flava_data::masking::{BlockMaskConfig, BlockMaskGenerator};
use flava_data::processor::{decode_image, to_rgb8};
use flava_data::stream::DecodedSample;
use flava_data::synthetic::{render, scene, Split};
use flava_data::task::Task;
use rand::SeedableRng;
use rayon::prelude::*;

const BATCH: usize = 32;

fn jpegs() -> Vec<Vec<u8>> {
    (0..BATCH as u64)
        .map(|i| {
            let img = render(&scene(1, Split::Train, i), 256, i);
            let mut out = std::io::Cursor::new(Vec::new());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .encode_image(&img)
                .unwrap();
            out.into_inner()
        })
        .collect()
}

fn bench_pipeline(c: &mut Criterion) {
    let files = jpegs();
    let builder = BatchBuilder::new(
        BatchConfig {
            batch_size: BATCH,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let device = Device::flex();
    let mut g = c.benchmark_group("data");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    let mut step = 0u64;
    g.bench_function("jpeg256_to_224+112_mask_collate", |b| {
        b.iter(|| {
            step += 1;
            pool.install(|| {
                let samples: Vec<DecodedSample> = files
                    .par_iter()
                    .enumerate()
                    .map(|(i, f)| DecodedSample {
                        key: i.to_string(),
                        image: Some(to_rgb8(&decode_image(f).unwrap())),
                        text: None,
                        label: None,
                    })
                    .collect();
                let host = builder.build(Task::Images, samples, step).unwrap();
                host.to_device(&device)
            })
        })
    });
    let gen = BlockMaskGenerator::new(BlockMaskConfig::default()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    g.throughput(Throughput::Elements(1));
    g.sample_size(50);
    g.bench_function("block_mask_14x14_75_16", |b| b.iter(|| gen.generate(&mut rng)));
    g.finish();
}

criterion_group!(benches, bench_pipeline);
criterion_main!(benches);
