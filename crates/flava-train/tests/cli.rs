//! The `flava` binary end to end: `flava embed --json` against HF's `FlavaProcessor` +
//! `FlavaModel` on a complete tiny model directory (tolerance 1e-4), `flava convert`, and errors.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn flava() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flava"))
}

#[derive(serde::Deserialize)]
struct Expected {
    images: Vec<String>,
    texts: Vec<String>,
    max_length: usize,
    image_features: Vec<Vec<f32>>,
    text_features: Vec<Vec<f32>>,
    logits_per_image: Vec<Vec<f32>>,
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

#[test]
fn embed_json_matches_transformers() {
    let e: Expected =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("embed_expected.json")).unwrap()).unwrap();
    let mut cmd = flava();
    cmd.args(["embed", "--json", "--max-length", &e.max_length.to_string(), "--model"])
        .arg(fixtures().join("embed_model"));
    for i in &e.images {
        cmd.arg("--image").arg(fixtures().join("processor").join(i));
    }
    for t in &e.texts {
        cmd.args(["--text", t]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |k: &str| -> Vec<Vec<f32>> { serde_json::from_value(v[k].clone()).unwrap() };
    let (di, dt, dl) = (
        max_diff(&get("image_features"), &e.image_features),
        max_diff(&get("text_features"), &e.text_features),
        max_diff(&get("logits_per_image"), &e.logits_per_image),
    );
    eprintln!("embed vs transformers: image {di:.1e}, text {dt:.1e}, logits {dl:.1e}");
    assert!(
        di <= 1e-4 && dt <= 1e-4 && dl <= 1e-4,
        "image {di}, text {dt}, logits {dl}"
    );
}

#[test]
fn embed_itm_matches_transformers_itm_head() {
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("itm_expected.json")).unwrap()).unwrap();
    let mut cmd = flava();
    cmd.args(["embed", "--json", "--itm", "--max-length", "16", "--model"])
        .arg(fixtures().join("pretraining"));
    for i in e["images"].as_array().unwrap() {
        cmd.arg("--image")
            .arg(fixtures().join("processor").join(i.as_str().unwrap()));
    }
    for t in e["texts"].as_array().unwrap() {
        cmd.args(["--text", t.as_str().unwrap()]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<Vec<f32>> = serde_json::from_value(v["itm_match_probability"].clone()).unwrap();
    let want: Vec<Vec<f32>> = serde_json::from_value(e["itm_match_probability"].clone()).unwrap();
    let d = max_diff(&got, &want);
    eprintln!("itm_match_probability vs transformers: {d:.1e}");
    assert!(d <= 1e-4, "{d}");

    // A FlavaModel checkpoint has no ITM head: a clear error, not random weights.
    let out = flava()
        .args(["embed", "--itm", "--text", "a cat", "--model"])
        .arg(fixtures().join("embed_model"))
        .arg("--image")
        .arg(fixtures().join("processor").join("rgba_80x64.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ITM head") && err.contains("itm_head."), "{err}");
}

#[test]
fn embed_text_only_prints_a_table() {
    let out = flava()
        .args(["embed", "--text", "a photo of a cat", "--model"])
        .arg(fixtures().join("embed_model"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.contains("text \"a photo of a cat\"") && s.contains("(24 dims)"),
        "{s}"
    );
    // max_length 77 exceeds the tiny model's 64 positions: clamped with a note, not a crash.
    assert!(String::from_utf8_lossy(&out.stderr).contains("using 64"));
}

#[test]
fn embed_errors_are_clear() {
    let out = flava()
        .args(["embed", "--text", "x", "--model", "/nonexistent/model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model: no such file or directory"), "{err}");
    // A directory that exists but is not a model names the file it lacks.
    let empty = std::env::temp_dir().join(format!("flava-cli-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = flava()
        .args(["embed", "--text", "x", "--model"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json"), "{err}");
    std::fs::remove_dir_all(&empty).unwrap();
    let out = flava()
        .args(["embed", "--model"])
        .arg(fixtures().join("embed_model"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to embed"));
    let out = flava()
        .args(["embed", "--image", "/nonexistent.png", "--model"])
        .arg(fixtures().join("embed_model"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.png"));
}

#[test]
fn convert_writes_safetensors_that_embed_can_load() {
    let dir = std::env::temp_dir().join(format!("flava-cli-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("tiny_pretraining");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let out = flava()
        .arg("convert")
        .arg(src.join("pytorch_model.bin"))
        .arg(dir.join("model.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("dropped 1 non-float buffers: flava.text_model.embeddings.position_ids"),
        "{s}"
    );
    std::fs::copy(
        fixtures().join("embed_model/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let out = flava()
        .args(["embed", "--json", "--text", "a cat", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn masks_json_has_the_documented_shape() {
    let out = flava()
        .args([
            "masks",
            "--grid",
            "14x14",
            "--num-masking-patches",
            "75",
            "--min-patches",
            "16",
            "--samples",
            "5",
            "--seed",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let masks: Vec<Vec<u8>> = serde_json::from_value(v["masks"].clone()).unwrap();
    assert_eq!(masks.len(), 5);
    for m in &masks {
        assert_eq!(m.len(), 196);
        let n = m.iter().filter(|&&b| b == 1).count();
        assert!((16..=75).contains(&n), "{n}");
    }
    let again = flava()
        .args(["masks", "--samples", "5", "--seed", "3", "--json"])
        .output()
        .unwrap();
    assert_eq!(again.stdout, out.stdout, "same seed, same masks");
    let bad = flava()
        .args(["masks", "--grid", "4x4", "--num-masking-patches", "20"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn data_shards_then_inspect() {
    let dir = std::env::temp_dir().join(format!("flava-cli-shards-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let out = flava()
        .args([
            "data",
            "shards",
            "--from",
            "synthetic",
            "--shard-size",
            "10",
            "--limit",
            "25",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 25 samples in 3 shards"));
    let pattern = format!("{}/{{000000..000002}}.tar", dir.display());
    let out = flava().args(["data", "inspect", &pattern]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("total: 25 samples in 3 shards") && s.contains("\"image\": \"64x64\""),
        "{s}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn codebook_json_prints_one_token_grid_per_image() {
    let out = flava()
        .args(["codebook", "--json", "--model"])
        .arg(fixtures().join("codebook"))
        .arg("--image")
        .arg(fixtures().join("processor/landscape_300x200.png"))
        .arg("--image")
        .arg(fixtures().join("processor/photo_256x256.jpg"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens: Vec<Vec<u32>> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t.len() == 14 * 14 && t.iter().all(|&x| x < 99)));
    assert!(
        tokens[0].iter().collect::<std::collections::BTreeSet<_>>().len() > 1,
        "the image's shapes give several tokens"
    );
    let bad = flava()
        .args(["codebook", "--model", "/nonexistent", "--image", "x.png"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("no such file or directory"));
    let bad = flava()
        .args(["codebook", "--model"])
        .arg(fixtures().join("processor"))
        .args(["--image", "x.png"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("config.json"));
}

#[test]
fn convert_never_destroys_data() {
    let dir = std::env::temp_dir().join(format!("flava-convert-guard-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("m.pt");
    std::fs::copy(fixtures().join("codebook_dalle_keys.pt"), &bin).unwrap();
    let before = std::fs::read(&bin).unwrap();
    let out = flava().args(["convert"]).arg(&bin).arg(&bin).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the input"));
    assert_eq!(std::fs::read(&bin).unwrap(), before, "the input is untouched");
    // An existing output is kept unless --force.
    let st = dir.join("model.safetensors");
    std::fs::write(&st, b"precious").unwrap();
    let out = flava().args(["convert"]).arg(&bin).arg(&st).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&st).unwrap(), b"precious");
    // A checkpoint with no float tensors writes nothing, even with --force.
    let empty = dir.join("empty.bin");
    std::fs::copy(fixtures().join("hostile/empty_state_dict.bin"), &empty).unwrap();
    let out = flava()
        .args(["convert", "--force"])
        .arg(&empty)
        .arg(&st)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no float tensors"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&st).unwrap(), b"precious");
    let out = flava()
        .args(["convert", "--force"])
        .arg(&bin)
        .arg(&st)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn data_shards_refuse_to_overwrite_and_force_leaves_no_stale_shard() {
    let dir = std::env::temp_dir().join(format!("flava-shards-guard-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("000007.tar"), b"old").unwrap();
    let args = [
        "data",
        "shards",
        "--from",
        "synthetic",
        "--shard-size",
        "5",
        "--limit",
        "10",
        "--out",
    ];
    let out = flava().args(args).arg(&dir).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds 1 shard"));
    let out = flava().args(args).arg(&dir).arg("--force").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["000000.tar", "000001.tar"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn embed_eval_and_masks_refuse_nonsense_arguments() {
    let model = fixtures().join("embed_model");
    let out = flava()
        .args(["embed", "--model"])
        .arg(&model)
        .args(["--text", "a", "--max-length", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-length"));
    let out = flava()
        .args(["eval", "zero-shot", "--model"])
        .arg(&model)
        .args(["--data", "synthetic:classes", "--template", "a photo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no `{}`"));
    let out = flava().args(["masks", "--min-patches", "1000"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("min_num_patches 1000"));
    for (args, want) in [
        (vec!["masks", "--grid", "100000x100000"], "grid cells"),
        (vec!["masks", "--samples", "1000000000000"], "--samples"),
    ] {
        let out = flava().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `--reader-limit` sets a limit for any command: with 10 pixels allowed, a 256x256 photo is
/// refused with the limit's name; an unknown name is an error that lists the known ones.
#[test]
fn reader_limits_are_configurable_on_the_command_line() {
    let photo = fixtures().join("processor/photo_256x256.jpg");
    let out = flava()
        .args(["--reader-limit", "max_image_pixels=10", "codebook", "--model"])
        .arg(fixtures().join("codebook"))
        .arg("--image")
        .arg(&photo)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("65536 pixels") && e.contains("max_image_pixels"), "{e}");
    let out = flava()
        .args(["codebook", "--reader-limit", "max_pixels=10", "--model"])
        .arg(fixtures().join("codebook"))
        .arg("--image")
        .arg(&photo)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown limit `max_pixels`"));
    let out = flava()
        .args(["codebook", "--json", "--model"])
        .arg(fixtures().join("codebook"))
        .arg("--image")
        .arg(&photo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `flava eval linear-probe` then `flava eval classify` on the probe it saved: JSON reports,
/// a predictions file with one line per example; a plain FLAVA directory is refused by
/// `classify` with a message saying it has no task head, and VQA by the probe.
#[test]
fn linear_probe_then_classify_on_its_head() {
    let model = fixtures().join("embed_model");
    let out_dir = std::env::temp_dir().join(format!("flava-cli-probe-{}", std::process::id()));
    std::fs::remove_dir_all(&out_dir).ok();
    let out = flava()
        .args(["eval", "linear-probe", "--model"])
        .arg(&model)
        .args(["--train", "synthetic:classes", "--val", "synthetic:classes:heldout"])
        .args(["--synthetic-len", "48", "--max-iter", "100", "--json", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["feature"], "image");
    assert_eq!(r["val"]["n"], 24);
    assert!(r["strength"].as_f64().unwrap() > 0.0 && r["sweep"]["tried"].as_array().unwrap().len() >= 9);
    assert!(out_dir.join("probe.json").is_file() && out_dir.join("features/val.safetensors").is_file());
    let preds = out_dir.join("pred.jsonl");
    let out = flava()
        .args(["eval", "classify", "--model"])
        .arg(out_dir.join("model"))
        .args([
            "--data",
            "synthetic:classes:heldout",
            "--synthetic-len",
            "24",
            "--json",
            "--predictions",
        ])
        .arg(&preds)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (c["n"].as_u64(), c["predictions"].as_u64()),
        (Some(24), Some(24)),
        "{c}"
    );
    assert!(c["top5"].as_f64().is_some() && c["mean_per_class_recall"].as_f64().is_some());
    assert_eq!(std::fs::read_to_string(&preds).unwrap().lines().count(), 24);
    let out = flava()
        .args(["eval", "classify", "--model"])
        .arg(&model)
        .args(["--data", "synthetic:classes:heldout"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no task head"));
    let out = flava()
        .args(["eval", "linear-probe", "--model"])
        .arg(&model)
        .args([
            "--train",
            "synthetic:vqa",
            "--val",
            "synthetic:vqa:heldout",
            "--synthetic-len",
            "8",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs class labels"));
    std::fs::remove_dir_all(&out_dir).ok();
}
