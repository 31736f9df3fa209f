//! The GPU code path (Burn's cube kernels, which CUDA shares) on the `wgpu` device, run in CI on
//! a software Vulkan driver (Mesa's lavapipe): `flava embed --device wgpu` against transformers'
//! features, logits and ITM probabilities (tolerance 1e-4, as on flex; measured on lavapipe:
//! 7.2e-7), and 4 pretraining steps on wgpu against the same steps on flex from the same initial
//! weights (drawn on the CPU whatever the device): every loss within 1e-5 relative at step 1,
//! where only the forward differs (measured 3e-7), and 1e-4 at steps 2-4, after updates
//! (measured 4.4e-6). Built only with `--features wgpu` or `wgpu-untuned` (CI: without CubeCL's
//! autotuning, which on lavapipe cost more than the rest of the run); `FLAVA_REQUIRE_WGPU=1` (CI)
//! turns a missing adapter into a failure instead of a skip.
#![cfg(feature = "wgpu-untuned")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The binary with CubeCL's autotuning at its minimum: on a software driver, benchmarking
/// kernel variants costs far more than it saves.
fn flava() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flava"));
    c.env("CUBECL_AUTOTUNE_LEVEL", "minimal");
    c
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Whether the tests should run: with `FLAVA_REQUIRE_WGPU` set (CI) always, so a missing adapter
/// fails them with the driver's own error; otherwise a tiny embedding probes for an adapter and,
/// without one, the tests skip with a note. (The probe is not run where an adapter is required:
/// on lavapipe it costs 50-90 s of shader compilation per test.)
fn have_adapter() -> bool {
    if std::env::var_os("FLAVA_REQUIRE_WGPU").is_some() {
        return true;
    }
    let o = flava()
        .args(["embed", "--device", "wgpu", "--json", "--text", "a cat", "--model"])
        .arg(fixtures().join("embed_model"))
        .output()
        .unwrap();
    if o.status.success() {
        return true;
    }
    let e = String::from_utf8_lossy(&o.stderr);
    eprintln!(
        "skipped: no wgpu adapter (install mesa-vulkan-drivers for lavapipe; FLAVA_REQUIRE_WGPU=1 \
         makes this a failure): {}",
        e.lines().last().unwrap_or("")
    );
    false
}

/// The fixture's images and texts as `--image` / `--text` arguments.
fn inputs(cmd: &mut Command, e: &serde_json::Value) {
    for i in e["images"].as_array().unwrap() {
        cmd.arg("--image")
            .arg(fixtures().join("processor").join(i.as_str().unwrap()));
    }
    for t in e["texts"].as_array().unwrap() {
        cmd.args(["--text", t.as_str().unwrap()]);
    }
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn matrix(v: &serde_json::Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn embedding_and_itm_on_wgpu_match_transformers() {
    if !have_adapter() {
        return;
    }
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("embed_expected.json")).unwrap()).unwrap();
    let mut cmd = flava();
    cmd.args(["embed", "--device", "wgpu", "--json", "--max-length"])
        .arg(e["max_length"].to_string())
        .arg("--model")
        .arg(fixtures().join("embed_model"));
    inputs(&mut cmd, &e);
    let v = json(&cmd.output().unwrap());
    for k in ["image_features", "text_features", "logits_per_image"] {
        let d = max_diff(&matrix(&v[k]), &matrix(&e[k]));
        eprintln!("wgpu {k} vs transformers: {d:.1e}");
        assert!(d <= 1e-4, "{k}: {d}");
    }

    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("itm_expected.json")).unwrap()).unwrap();
    let mut cmd = flava();
    cmd.args([
        "embed",
        "--device",
        "wgpu",
        "--json",
        "--itm",
        "--max-length",
        "16",
        "--model",
    ])
    .arg(fixtures().join("pretraining"));
    inputs(&mut cmd, &e);
    let v = json(&cmd.output().unwrap());
    let d = max_diff(
        &matrix(&v["itm_match_probability"]),
        &matrix(&e["itm_match_probability"]),
    );
    eprintln!("wgpu itm_match_probability vs transformers: {d:.1e}");
    assert!(d <= 1e-4, "{d}");
}

fn pretrain(out: &Path, device: &str) -> Vec<serde_json::Value> {
    let o = flava()
        .args([
            "pretrain",
            "--preset",
            "tiny",
            "--batch-size",
            "8",
            "--steps",
            "4",
            "--warmup",
            "2",
        ])
        .args([
            "--phases",
            "joint",
            "--no-eval",
            "--checkpoint-every",
            "100",
            "--device",
            device,
        ])
        .arg("--tokenizer")
        .arg(fixtures().join("tokenizer").join("tokenizer.json"))
        .arg("--codebook")
        .arg(fixtures().join("codebook"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{device}: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn pretraining_steps_on_wgpu_follow_flex() {
    if !have_adapter() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("flava-wgpu-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let (flex, wgpu) = (pretrain(&dir.join("flex"), "flex"), pretrain(&dir.join("wgpu"), "wgpu"));
    assert_eq!(wgpu.len(), 4);
    for (i, (a, b)) in wgpu.iter().zip(&flex).enumerate() {
        let tol = if i == 0 { 1e-5 } else { 1e-4 };
        for k in [
            "loss",
            "mim",
            "mlm",
            "itm",
            "global_contrastive",
            "mmm_image",
            "mmm_text",
        ] {
            if let (Some(x), Some(y)) = (a[k].as_f64(), b[k].as_f64()) {
                eprintln!("step {} {k}: wgpu {x:.6} flex {y:.6}", i + 1);
                assert!(
                    (x - y).abs() <= tol * y.abs().max(1.0),
                    "step {} {k}: wgpu {x} vs flex {y}",
                    i + 1
                );
            }
        }
    }
    std::fs::remove_dir_all(dir).ok();
}
