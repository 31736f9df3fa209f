//! The linear probe (`flava_train::probe`): on committed features (tests/fixtures/probe, written
//! with scikit-learn's numbers by scripts/make_probe_fixtures.py) every strength of the sweep
//! gives scikit-learn's validation accuracy, the sweep chooses its strength and the refit's test
//! accuracy, top-5 and mean per-class recall are within 0.5 points; end to end on a tiny model,
//! features are cached and reused, and the saved probe loads in `flava eval classify` with the
//! same test accuracy.

use std::path::PathBuf;

use burn::prelude::*;
use flava_data::tasks::TaskOptions;
use flava_train::eval_cmd::classify;
use flava_train::metrics;
use flava_train::observer::Quiet;
use flava_train::probe::{fit, run, sweep, Features, ProbeConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(name: &str) -> Features {
    Features::load(&fixtures().join(format!("probe/{name}.safetensors")))
        .unwrap()
        .0
}

/// Half a point, the bar.
const POINTS: f64 = 0.005;

#[test]
fn the_probe_matches_scikit_learn_on_the_same_features() {
    let sk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("probe/sklearn.json")).unwrap()).unwrap();
    let (train, val, test) = (load("train"), load("val"), load("test"));
    let classes = sk["classes"].as_u64().unwrap() as usize;
    assert_eq!((train.len(), val.len(), test.len(), train.dim), (1600, 800, 1600, 16));
    // Every strength scikit-learn tried, one by one.
    for pair in sk["tried"].as_array().unwrap() {
        let (s, theirs) = (pair[0].as_f64().unwrap(), pair[1].as_f64().unwrap());
        let ours = fit(&train, classes, s, 1000).unwrap().accuracy(&val);
        eprintln!("strength {s:e}: val top-1 ours {ours:.5}, scikit-learn {theirs:.5}");
        assert!(
            (ours - theirs).abs() <= POINTS,
            "strength {s:e}: ours {ours}, scikit-learn {theirs}"
        );
    }
    // The sweep chooses the same strength; the refit on train + val scores the same on test.
    let sw = sweep(&train, &val, classes, 1000, &mut Quiet).unwrap();
    assert_eq!(sw.tried.len(), sk["tried"].as_array().unwrap().len());
    assert!(
        (sw.best / sk["strength"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{sw:?}"
    );
    let refit = fit(&train.concat(&val), classes, sw.best, 1000).unwrap();
    let ours = refit.accuracy(&test);
    let theirs = sk["test"]["accuracy"].as_f64().unwrap();
    eprintln!("test top-1 ours {ours:.5}, scikit-learn {theirs:.5}");
    assert!(
        (ours - theirs).abs() <= POINTS,
        "test top-1: ours {ours}, scikit-learn {theirs}"
    );
    let logits = refit.logits(&test);
    let pred: Vec<usize> = logits
        .chunks(classes)
        .map(|r| (0..classes).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap())
        .collect();
    let top5 = metrics::top_k(&logits, classes, &test.labels, 5);
    let recall = metrics::mean_per_class_recall(&pred, &test.labels, classes);
    for (name, ours, key) in [
        ("top-5", top5, "top5"),
        ("mean per-class recall", recall, "mean_per_class_recall"),
    ] {
        let theirs = sk["test"][key].as_f64().unwrap();
        eprintln!("test {name} ours {ours:.5}, scikit-learn {theirs:.5}");
        assert!(
            (ours - theirs).abs() <= POINTS,
            "test {name}: ours {ours}, scikit-learn {theirs}"
        );
    }
}

#[test]
fn features_files_round_trip_and_few_shot_keeps_k_per_class() {
    let train = load("train");
    let dir = std::env::temp_dir().join(format!("flava-probe-features-{}", std::process::id()));
    let path = dir.join("train.safetensors");
    let meta = std::collections::HashMap::from([("fingerprint".to_string(), "x".to_string())]);
    train.save(&path, meta.clone()).unwrap();
    let (back, m) = Features::load(&path).unwrap();
    assert_eq!(back, train);
    assert_eq!(m.get("fingerprint"), meta.get("fingerprint"));
    let few = train.fewshot(3, 0);
    for c in 0..8 {
        assert_eq!(few.labels.iter().filter(|&&l| l == c).count(), 3);
    }
    assert_eq!(few.fewshot(3, 0), few, "rows keep their order");
    // A file of another layout is an error, not a panic.
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(Features::load(&path).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn end_to_end_the_probe_caches_features_and_its_head_loads_in_classify() {
    let out = std::env::temp_dir().join(format!("flava-probe-run-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let cfg = ProbeConfig {
        model: fixtures().join("embed_model"),
        train: "synthetic:classes".into(),
        val: "synthetic:classes:heldout".into(),
        test: Some("synthetic:classes:heldout".into()),
        out: out.clone(),
        synthetic_len: 96,
        max_iter: 200,
        ..Default::default()
    };
    let device = Device::flex();
    let first = run(&cfg, &device, &mut Quiet).unwrap();
    assert!(first.reused.is_empty());
    assert_eq!(first.n_train, 96);
    for split in ["train", "val", "test"] {
        assert!(out.join(format!("features/{split}.safetensors")).is_file(), "{split}");
    }
    let test = first.test.clone().unwrap();
    assert_eq!(test.n, 48);
    assert!(test.accuracy.unwrap() > 1.5 / 24.0, "above chance: {test:?}");
    assert!(test.top5.is_some() && test.mean_per_class_recall.is_some());
    // Unchanged model and data: the features are reused, the result is the same.
    let again = run(&cfg, &device, &mut Quiet).unwrap();
    assert_eq!(again.reused, ["train", "val", "test"]);
    assert_eq!(again.test.as_ref().unwrap().accuracy, test.accuracy);
    // Other data: extracted again.
    let fewer = run(
        &ProbeConfig {
            synthetic_len: 48,
            ..cfg.clone()
        },
        &device,
        &mut Quiet,
    )
    .unwrap();
    assert!(fewer.reused.is_empty());
    // The saved probe is a task model: classify gives the probe's test accuracy on the test set.
    let opts = TaskOptions {
        synthetic_len: 24,
        ..Default::default()
    };
    let c = classify(
        &fewer.model_dir,
        "synthetic:classes:heldout",
        &opts,
        16,
        Some(&out.join("pred.jsonl")),
        &device,
        &mut Quiet,
    )
    .unwrap();
    let probe_acc = fewer.test.as_ref().unwrap().accuracy.unwrap();
    assert!(
        (c.eval.accuracy.unwrap() - probe_acc).abs() <= 1.0 / 24.0 + 1e-9,
        "classify {:?} vs probe {probe_acc}",
        c.eval.accuracy
    );
    let lines = std::fs::read_to_string(out.join("pred.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 24);
    let first_line: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(first_line["label"].is_string() && first_line["score"].as_f64().unwrap() > 0.0);
    std::fs::remove_dir_all(&out).ok();
}
