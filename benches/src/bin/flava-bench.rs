//! `flava-bench`: times one configuration of flava-rs and prints one JSON line, so that
//! `benches/compare_pytorch.py` can alternate it with the same configuration in PyTorch:
//! `{"what": .., "preset": .., "batch": .., "times_ms": [..], "peak_rss_mb": ..}`.
//!
//! ```text
//! flava-bench config --preset small                      # the preset as HF config.json
//! flava-bench image  --preset full  --batch 8 --iters 5  # image tower, no autograd
//! flava-bench text   --preset small --batch 32 --iters 10
//! flava-bench image-features --preset full --batch 8   # image tower read at CLS, projected
//! flava-bench step   --preset small --batch 32 --task pairs --iters 5   # Trainer::step
//! flava-bench forward --preset full --batch 8 --iters 3  # paired pretraining forward, no autograd
//! flava-bench finetune --preset small --batch 32 --iters 5   # multimodal classification step
//! flava-bench sgemm --batch 2048 --iters 10                 # one [n, n]·[n, n] f32 matmul
//! flava-bench step --preset small --task text --products     # and where the products' time goes
//! ```
//! The first iteration warms up and is not reported. Inputs are random with fixed seeds; shapes
//! and masking follow `flava_benches::inputs` (the Python side builds the same ones).

use std::time::Instant;

use burn::prelude::*;
use clap::{Parser, ValueEnum};
use flava_benches::inputs::{pretraining_batch, BenchTask, SEQ};
use flava_benches::step::training_step;
use flava_fusion::{FlavaConfig, FlavaModel};
use flava_fusion::{FlavaInput, Tower};
use flava_objectives::{ClassifierConfig, FlavaForClassification, FlavaForPretraining, StepOptions, TaskTargets};
use flava_train::finetune::{FinetuneBatch, Finetuning};
use flava_train::trainer::{Trainer, TrainerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum What {
    /// Print the preset's HF `config.json`.
    Config,
    /// Image tower forward (inference).
    Image,
    /// Text tower forward (inference).
    Text,
    /// Contrastive image features (inference): the image tower read at its CLS token and
    /// projected, what `flava embed`, zero-shot and retrieval compute (`image` times the whole
    /// last hidden state instead).
    ImageFeatures,
    /// Pretraining step: forward, backward, AdamW.
    Step,
    /// Paired pretraining forward without autograd.
    Forward,
    /// Fine-tuning step: FlavaModel + classifier head on the multimodal CLS (3 classes,
    /// cross-entropy), forward, backward, AdamW.
    Finetune,
    /// One square f32 matmul [n, n]·[n, n] with n = `--batch` through the kernels' product (the
    /// sgemm peak probe).
    Sgemm,
}

#[derive(Debug, Parser)]
#[command(about = "Times one flava-rs configuration (see benches/compare_pytorch.py)")]
struct Args {
    /// What to time.
    #[arg(value_enum)]
    what: What,
    /// tiny, small or full.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Samples per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed iterations (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Batch kind of `step`.
    #[arg(long, value_enum, default_value = "pairs")]
    task: BenchTask,
    /// `flex` (CPU), or `cuda` / `wgpu` when built with that feature.
    #[arg(long, default_value = "flex")]
    device: String,
    /// Also time every matrix product of the flex kernels during the timed iterations and add
    /// them to the JSON line (`products`: per iteration, by shape and layout) and to stderr.
    #[arg(long)]
    products: bool,
}

/// Classes of the fine-tuning bench (SNLI-VE's three).
const FINETUNE_CLASSES: usize = 3;

/// Waits for the device's queued work (GPU backends run asynchronously; flex is eager).
fn sync(device: &Device) {
    device.sync().expect("device execution failed");
}

/// Peak resident set of this process, from `/proc/self/status` (MiB; 0 where unavailable).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One warm-up call of `f`, then `iters` timed ones (ms). Products recorded before the timed
/// ones (`--products`: set-up and the warm-up) are dropped.
fn time(iters: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    flava_vit::kernels::blas::take_product_stats();
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

/// The recorded products per timed iteration, as JSON, and a table of them on stderr: the time in
/// products (the parallel ones as the caller waited; the one-thread ones, run from parallel loops,
/// divided by rayon's threads) and each kind's GFLOP/s in place.
fn products_json(iters: usize) -> serde_json::Value {
    let stats = flava_vit::kernels::blas::take_product_stats();
    let per_iter = |x: f64| x / iters.max(1) as f64;
    let threads = rayon::current_num_threads() as f64;
    let wall: f64 = stats
        .iter()
        .map(|p| if p.parallel { p.seconds } else { p.seconds / threads })
        .sum();
    let flops: f64 = stats.iter().map(|p| p.flops()).sum();
    eprintln!(
        "products per iteration: {:.1} ms, {:.2} GFLOP, {:.0} GFLOP/s ({} kinds; one-thread ones counted as their time over {threads} threads)",
        per_iter(wall) * 1e3,
        per_iter(flops) / 1e9,
        flops / wall.max(1e-12) / 1e9,
        stats.len()
    );
    eprintln!("| m | n | k | layout | threads | calls/iter | ms/iter | GFLOP/s |\n|---|---|---|---|---|---|---|---|");
    for p in stats.iter().take(15) {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} |",
            p.m,
            p.n,
            p.k,
            p.layout,
            if p.parallel { "all" } else { "one" },
            p.calls / iters.max(1),
            per_iter(p.seconds) * 1e3,
            p.gflops()
        );
    }
    serde_json::json!({
        "ms": per_iter(wall) * 1e3,
        "gflop": per_iter(flops) / 1e9,
        "kinds": stats.iter().map(|p| serde_json::json!({
            "m": p.m, "n": p.n, "k": p.k, "layout": p.layout, "parallel": p.parallel,
            "calls": p.calls / iters.max(1), "ms": per_iter(p.seconds) * 1e3, "gflops": p.gflops(),
        })).collect::<Vec<_>>(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    flava_vit::kernels::blas::record_products(args.products);
    // As the `flava` binary does: reuse freed memory (flava_train::alloc::tune_allocator).
    flava_train::alloc::tune_allocator();
    let cfg = FlavaConfig::preset(&args.preset)?;
    if args.what == What::Config {
        println!("{}", cfg.to_json_pretty("FlavaForPreTraining"));
        return Ok(());
    }
    let device = flava_train::pick_device(&args.device)?;
    device.seed(0);
    let b = args.batch;
    // Step only: [forward, backward, optimizer] ms per iteration.
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let times = match args.what {
        What::Config => unreachable!("handled above"),
        What::Sgemm => {
            let a = Tensor::<2>::random([b, b], burn::tensor::Distribution::Uniform(-1.0, 1.0), &device);
            let c = Tensor::<2>::random([b, b], burn::tensor::Distribution::Uniform(-1.0, 1.0), &device);
            // Through the kernels' product (the model's Linear layers), so on the backend they use.
            time(args.iters, || {
                flava_vit::kernels::linear(a.clone(), c.clone(), None).into_data();
            })
        }
        What::ImageFeatures => {
            let model = FlavaModel::new(&cfg, &device);
            let batch = pretraining_batch(&cfg, b, BenchTask::Pairs, &device);
            let px = batch.pixel_values.expect("pairs have pixels");
            time(args.iters, || {
                model.image_features(px.clone()).into_data();
            })
        }
        What::Image | What::Text => {
            let model = FlavaModel::new(&cfg, &device);
            let batch = pretraining_batch(&cfg, b, BenchTask::Pairs, &device);
            if args.what == What::Image {
                let px = batch.pixel_values.expect("pairs have pixels");
                time(args.iters, || {
                    let out = model.image_model.forward(px.clone(), None, false, false);
                    out.last_hidden_state.into_data();
                })
            } else {
                let ids = batch.input_ids.expect("pairs have text");
                let mask = batch.attention_mask;
                time(args.iters, || {
                    let out = model.text_model.forward(ids.clone(), mask.as_ref(), None, false);
                    out.last_hidden_state.into_data();
                })
            }
        }
        What::Forward => {
            let model = FlavaForPretraining::new(&cfg, &device);
            let batch = pretraining_batch(&cfg, b, BenchTask::Pairs, &device);
            time(args.iters, || {
                let out = model.forward(&batch, &StepOptions::default()).expect("paired batch");
                out.total.expect("losses").into_data();
            })
        }
        What::Step => {
            let ad = device.clone().autodiff();
            let mut trainer = training_step(FlavaForPretraining::new(&cfg, &ad), &ad);
            let batch = pretraining_batch(&cfg, b, args.task, &ad);
            let times = time(args.iters, || {
                let t = Instant::now();
                let m = trainer
                    .step(&batch, &mut flava_train::observer::Quiet)
                    .expect("a training step");
                sync(&ad);
                assert!(m.updated, "the bench batch must train");
                let all = t.elapsed().as_secs_f64() * 1e3;
                let (f, bw) = (trainer.objective.forward_ms.get(), trainer.objective.backward_ms.get());
                phases.push([f, bw, all - f - bw]);
            });
            // Drop the warm-up's phases.
            phases.remove(0);
            times
        }
        What::Finetune => {
            let ad = device.clone().autodiff();
            let head = ClassifierConfig {
                tower: Tower::Multimodal,
                num_classes: FINETUNE_CLASSES,
                ..Default::default()
            };
            let model = FlavaForClassification::new(FlavaModel::new(&cfg, &ad), &cfg, &head, &ad);
            let mut trainer = Trainer::new(
                model,
                Finetuning,
                TrainerConfig {
                    optimizer: flava_train::OptimizerConfig {
                        lr: 1e-4,
                        min_lr_ratio: 1.0,
                        ..Default::default()
                    },
                    steps: usize::MAX,
                    max_nonfinite: usize::MAX,
                },
            );
            let p = pretraining_batch(&cfg, b, BenchTask::Pairs, &ad);
            let gold: Vec<usize> = (0..b).map(|k| k % FINETUNE_CLASSES).collect();
            let batch = FinetuneBatch {
                input: FlavaInput {
                    pixel_values: p.pixel_values,
                    input_ids: p.input_ids,
                    attention_mask: p.attention_mask,
                    ..Default::default()
                },
                targets: TaskTargets::Classes(gold.clone()),
                size: b,
                ids: (0..b).map(|k| k.to_string()).collect(),
                labelled: vec![true; b],
                soft: vec![vec![]; b],
                gold,
                values: vec![0.0; b],
            };
            time(args.iters, || {
                let m = trainer
                    .step(&batch, &mut flava_train::observer::Quiet)
                    .expect("a fine-tuning step");
                sync(&ad);
                assert!(m.updated, "the bench batch must train");
            })
        }
    };
    let median = |i: usize| {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let line = serde_json::json!({
        "what": format!("{:?}", args.what).to_lowercase(),
        "task": format!("{:?}", args.task).to_lowercase(),
        "preset": args.preset,
        "batch": b,
        "seq": SEQ,
        "times_ms": times,
        "forward_ms": median(0),
        "backward_ms": median(1),
        "optimizer_ms": median(2),
        "peak_rss_mb": peak_rss_mb(),
        "device": args.device,
        // Where the flex kernels' matrix products ran (the gemm crate or a BLAS, FLAVA_BLAS).
        "sgemm_backend": flava_vit::kernels::blas::gemm_backend().describe(),
        // What the GPU allocator holds at the end (its pools keep pages): the peak, near enough.
        "device_reserved_mb": device.memory_pool_usage().map(|u| u.bytes_reserved as f64 / 1048576.0),
        "products": if args.products { products_json(args.iters) } else { serde_json::Value::Null },
    });
    println!("{line}");
    Ok(())
}
