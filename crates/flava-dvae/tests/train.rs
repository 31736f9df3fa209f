//! dVAE training mechanics on a tiny model: the loss falls, files are written in the HF layout,
//! a run resumes from its checkpoint, and reconstructions have the input's shape.

use burn::prelude::*;
use flava_data::stream::{open_source, SourceOptions, Task};
use flava_dvae::decoder::DecoderConfig;
use flava_dvae::train::{load_trained, train, DvaeTrainConfig};
use flava_dvae::{load_codebook, FlavaImageCodebookConfig};

fn tiny(steps: usize) -> DvaeTrainConfig {
    DvaeTrainConfig {
        codebook: FlavaImageCodebookConfig {
            hidden_size: 8,
            vocab_size: 32,
            ..Default::default()
        },
        decoder: DecoderConfig {
            vocab_size: 32,
            n_init: 8,
            hidden_size: 8,
            num_blocks_per_group: 1,
            output_channels: 3,
        },
        image_size: 16,
        batch_size: 8,
        steps,
        lr: 3e-3,
        warmup: 2,
        checkpoint_every: 5,
        ..Default::default()
    }
}

fn source() -> Box<dyn flava_data::sources::Source> {
    open_source(
        "synthetic",
        Task::Images,
        &SourceOptions {
            synthetic_image_size: 16,
            synthetic_len: 64,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn trains_saves_and_resumes() {
    let out = std::env::temp_dir().join(format!("flava-dvae-train-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let device = Device::flex();
    let mut losses = vec![];
    let first = train(&tiny(10), source(), &out, false, &device, |m| {
        losses.push(m.reconstruction)
    })
    .unwrap();
    assert_eq!(first.state.step, 10);
    let early = losses[..3].iter().sum::<f64>() / 3.0;
    let late = losses[7..].iter().sum::<f64>() / 3.0;
    assert!(late < early, "reconstruction loss should fall: {early} -> {late}");
    // The codebook loads as an HF codebook; the trained model reloads for reconstruction.
    let (cb, cfg, report) = load_codebook(out.join("codebook"), &device).unwrap();
    assert_eq!((cfg.vocab_size, cfg.hidden_size), (32, 8));
    assert!(report.missing.is_empty());
    let x = Tensor::<4>::random([2, 3, 16, 16], burn::tensor::Distribution::Uniform(0.1, 0.9), &device);
    assert_eq!(cb.tokens(x.clone()).dims(), [2, 4]);
    let (m, _) = load_trained(&out, &device).unwrap();
    assert_eq!(m.reconstruct(x).dims(), [2, 3, 16, 16]);
    // Resume to 14 steps: continues at 10.
    let mut steps = vec![];
    let second = train(&tiny(14), source(), &out, true, &device, |m| steps.push(m.step)).unwrap();
    assert_eq!(steps, vec![11, 12, 13, 14]);
    assert_eq!(second.state.step, 14);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, 14);
    std::fs::remove_dir_all(&out).ok();
}
