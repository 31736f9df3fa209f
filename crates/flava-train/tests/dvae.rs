//! dVAE training on the workspace's Trainer (`flava_train::dvae`), tiny model: the loss falls,
//! files are written in the HF layout, same seed same run, a run killed mid-checkpoint resumes
//! from the previous checkpoint with each step once in metrics.jsonl, and reconstructions have
//! the input's shape.

use burn::prelude::*;
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;
use flava_dvae::decoder::DecoderConfig;
use flava_dvae::dvae::DvaeTrainConfig;
use flava_dvae::{load_codebook, FlavaImageCodebookConfig};
use flava_train::dvae::{load_trained, train};
use flava_train::observer::{Collect, Observer, Quiet, StepMetrics};

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

/// The flex device's RNG is process-wide and `train` seeds it: runs in this binary take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("flava-dvae-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

fn metric_lines(out: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Dies (panics) while the checkpoint of `step` is half written, as a kill would stop it.
struct DieAt(usize);

impl Observer for DieAt {
    fn before_commit(&mut self, step: usize, tmp_dir: &std::path::Path) {
        if step == self.0 {
            assert!(tmp_dir.join("state.json").is_file());
            panic!("killed while writing the checkpoint of step {step}");
        }
    }
}

/// Same seed, same run; a run killed while writing a checkpoint resumes from the previous
/// one and ends with the losses of the uninterrupted run, each step once in metrics.jsonl.
#[test]
fn same_seed_same_run_and_a_crash_mid_checkpoint_resumes_exactly() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let (a, b, c) = (scratch("seed-a"), scratch("seed-b"), scratch("crash"));
    train(&tiny(12), source(), &a, false, &device, &mut Quiet).unwrap();
    train(&tiny(12), source(), &b, false, &device, &mut Quiet).unwrap();
    let (la, lb) = (metric_lines(&a), metric_lines(&b));
    assert_eq!(la.len(), 12);
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-6, "step {s}: {x} vs {y} with the same seed");
    }

    let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train(&tiny(12), source(), &c, false, &device, &mut DieAt(10))
    }));
    assert!(died.is_err(), "the hook was meant to stop the run");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.join("checkpoints/step-00000005/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 5, "the checkpoint of step 5 is intact");
    assert!(
        c.join("checkpoints/step-00000010.tmp").is_dir(),
        "the interrupted write is left"
    );
    assert!(!c.join("checkpoints/step-00000010").exists());
    let mut seen = Collect::default();
    let resumed = train(&tiny(12), source(), &c, true, &device, &mut seen).unwrap();
    assert_eq!(resumed.state.counters.step, 12);
    assert!(
        seen.messages.iter().any(|m| m.contains("at step 5")),
        "{:?}",
        seen.messages
    );
    let lc = metric_lines(&c);
    assert_eq!(lc.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    for ((s, x), (_, y)) in lc.iter().zip(&la) {
        assert!((x - y).abs() <= 1e-5, "step {s}: {x} resumed vs {y} uninterrupted");
    }
    for d in [a, b, c] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn a_previous_run_is_not_overwritten_and_resume_refuses_other_settings() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let out = scratch("guard");
    train(&tiny(2), source(), &out, false, &device, &mut Quiet).unwrap();
    let codebook = std::fs::read(out.join("codebook/model.safetensors")).unwrap();
    let e = train(&tiny(2), source(), &out, false, &device, &mut Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("already holds a dVAE run"), "{e}");
    assert_eq!(std::fs::read(out.join("codebook/model.safetensors")).unwrap(), codebook);
    let mut other = tiny(4);
    other.codebook.vocab_size = 16;
    other.decoder.vocab_size = 16;
    let e = train(&other, source(), &out, true, &device, &mut Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("codebook") && e.contains("--resume"), "{e}");
    let mut bad = tiny(4);
    bad.lr = -1.0;
    let e = train(&bad, source(), &scratch("bad-lr"), false, &device, &mut Quiet)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lr"), "{e}");
    // A garbled or truncated dvae_config.json: resuming is an error naming the file, and the
    // run's codebook is left as it was.
    for garbage in ["{\"codebook\": {\"hidden_size\": ", "not json", "{\"lr\": \"fast\"}"] {
        std::fs::write(out.join("dvae_config.json"), garbage).unwrap();
        let e = train(&tiny(4), source(), &out, true, &device, &mut Quiet)
            .err()
            .unwrap();
        let e = format!("{e:#}");
        assert!(e.contains("dvae_config.json"), "{garbage}: {e}");
        assert_eq!(std::fs::read(out.join("codebook/model.safetensors")).unwrap(), codebook);
    }
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn trains_saves_and_resumes() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::env::temp_dir().join(format!("flava-dvae-train-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let device = Device::flex();
    let mut seen = Collect::default();
    let first = train(&tiny(10), source(), &out, false, &device, &mut seen).unwrap();
    let losses: Vec<f64> = seen.steps.iter().map(|m| m.term("reconstruction").unwrap()).collect();
    assert_eq!(first.state.counters.step, 10);
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
    let mut seen = Collect::default();
    let second = train(&tiny(14), source(), &out, true, &device, &mut seen).unwrap();
    let steps: Vec<usize> = seen.steps.iter().map(|m: &StepMetrics| m.step).collect();
    assert_eq!(steps, vec![11, 12, 13, 14]);
    assert_eq!(second.state.counters.step, 14);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, 14);
    std::fs::remove_dir_all(&out).ok();
}
