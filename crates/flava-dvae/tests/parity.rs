//! The codebook against transformers' `FlavaImageCodebook` (tiny config hidden 16, vocab 99,
//! DALL-E-style random weights; `scripts/make_fixtures.py`): logits and probabilities within 1e-4,
//! tokens equal; loaded from its HF directory, from DALL-E key names and from a FLAVA checkpoint.

use std::path::PathBuf;

use burn::prelude::*;
use flava_dvae::checkpoint::{codebook_from_state_dict, load_codebook, save_codebook};
use flava_dvae::ImageCodebook;
use flava_vit::weights::{read_int_tensors, StateDict};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn io() -> (Tensor<4>, Tensor<4>, Tensor<4>, Vec<i64>) {
    let p = fixtures().join("codebook_io.safetensors");
    let f = StateDict::from_file(&p).unwrap();
    let d = Device::flex();
    let t = |k: &str| {
        let r = f.get(k).unwrap();
        Tensor::<4>::from_data(TensorData::new(r.data.clone(), r.shape.clone()), &d)
    };
    (
        t("pixel_values"),
        t("logits"),
        t("probs"),
        read_int_tensors(&p).unwrap()["tokens"].1.clone(),
    )
}

fn check(model: &ImageCodebook, what: &str) {
    let (x, logits, probs, tokens) = io();
    let got = model.forward(x.clone());
    assert_eq!(got.dims(), [2, 99, 8, 8]);
    let dl = (got - logits).abs().max().into_scalar::<f32>();
    let dp = (model.probs(x.clone()) - probs).abs().max().into_scalar::<f32>();
    eprintln!("{what}: logits max |diff| {dl:.2e}, probs {dp:.2e}");
    assert!(dl <= 1e-4 && dp <= 1e-4, "{what}: logits {dl}, probs {dp}");
    let t: Vec<i64> = model.tokens(x).into_data().convert::<i64>().try_into_vec().unwrap();
    assert_eq!(t, tokens, "{what}: tokens");
}

#[test]
fn hf_codebook_directory() {
    let (m, cfg, report) = load_codebook(fixtures().join("codebook"), &Device::flex()).unwrap();
    assert_eq!((cfg.hidden_size, cfg.vocab_size), (16, 99));
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    check(&m, "HF directory");
}

#[test]
fn dalle_key_names_and_flava_prefix() {
    let (_, cfg, _) = load_codebook(fixtures().join("codebook"), &Device::flex()).unwrap();
    let dalle = StateDict::from_file(fixtures().join("codebook_dalle_keys.pt")).unwrap();
    assert!(dalle.tensors.keys().any(|k| k.ends_with(".w")));
    let (m, _) = codebook_from_state_dict(&cfg, &dalle, &Device::flex()).unwrap();
    check(&m, "DALL-E names");
    let hf = StateDict::from_file(fixtures().join("codebook/model.safetensors")).unwrap();
    let prefixed = StateDict {
        tensors: hf
            .tensors
            .iter()
            .map(|(k, v)| (format!("image_codebook.{k}"), v.clone()))
            .collect(),
        ignored: vec![],
    };
    let (m, report) = codebook_from_state_dict(&cfg, &prefixed, &Device::flex()).unwrap();
    assert!(report.unexpected.is_empty(), "{report}");
    check(&m, "image_codebook. prefix");
}

#[test]
fn saved_codebook_has_hf_keys_and_reloads() {
    let (m, cfg, _) = load_codebook(fixtures().join("codebook"), &Device::flex()).unwrap();
    let dir = std::env::temp_dir().join(format!("flava-codebook-{}", std::process::id()));
    save_codebook(&m, &cfg, &dir).unwrap();
    let ours = StateDict::from_file(dir.join("model.safetensors")).unwrap();
    let theirs = StateDict::from_file(fixtures().join("codebook/model.safetensors")).unwrap();
    assert_eq!(
        ours.tensors.keys().collect::<Vec<_>>(),
        theirs.tensors.keys().collect::<Vec<_>>()
    );
    let (back, _, _) = load_codebook(&dir, &Device::flex()).unwrap();
    check(&back, "saved and reloaded");
    std::fs::remove_dir_all(dir).ok();
}
