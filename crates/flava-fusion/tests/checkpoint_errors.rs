//! Bad checkpoints and configurations give errors that name the problem, never panics; the
//! other accepted layouts (standalone towers, `.bin` → safetensors) load.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use flava_fusion::checkpoint::{
    convert_to_safetensors, load_flava_model, load_image_model, load_text_model, CheckpointError,
};
use flava_fusion::{ConfigError, FlavaConfig};
use flava_vit::weights::{StateDict, WeightsError};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A scratch copy of a fixture directory, removed when dropped (also when the test fails).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A scratch copy of the fixture directory `from`.
fn scratch(name: &str, from: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("flava-ckpt-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join(from)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    Scratch(dir)
}

fn truncate(path: &Path, keep: f64) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..(bytes.len() as f64 * keep) as usize]).unwrap();
}

#[test]
fn truncated_safetensors_is_an_error() {
    let dir = scratch("trunc-st", "tiny");
    truncate(&dir.join("model.safetensors"), 0.6);
    let err = load_flava_model(&dir, &Device::flex()).unwrap_err();
    assert!(
        matches!(err, CheckpointError::Weights(WeightsError::Corrupt { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn truncated_and_garbage_bin_are_errors() {
    for (name, keep) in [("trunc-bin", 0.5), ("trunc-bin-head", 0.02)] {
        let dir = scratch(name, "tiny_pretraining");
        truncate(&dir.join("pytorch_model.bin"), keep);
        let err = load_flava_model(&dir, &Device::flex()).unwrap_err();
        assert!(
            matches!(err, CheckpointError::Weights(WeightsError::Corrupt { .. })),
            "{name}: {err}"
        );
    }
    let dir = scratch("garbage-bin", "tiny_pretraining");
    std::fs::write(
        dir.join("pytorch_model.bin"),
        b"\x80\x02not a pickle at all, just bytes",
    )
    .unwrap();
    let err = load_flava_model(&dir, &Device::flex()).unwrap_err();
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");
}

#[test]
fn shape_mismatch_names_the_key_and_both_shapes() {
    let dir = scratch("shape", "tiny");
    let mut cfg = FlavaConfig::from_file(dir.join("config.json")).unwrap();
    cfg.image_config.intermediate_size = 38;
    std::fs::write(dir.join("config.json"), cfg.to_json_pretty("FlavaModel")).unwrap();
    match load_flava_model(&dir, &Device::flex()).unwrap_err() {
        CheckpointError::Weights(WeightsError::ShapeMismatch { key, expected, found }) => {
            assert!(
                key.starts_with("image_model.encoder.layer.") && key.contains("dense"),
                "{key}"
            );
            assert!(
                expected.contains(&38) && found.contains(&37),
                "{key}: {expected:?} vs {found:?}"
            );
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
}

#[test]
fn missing_keys_are_reported() {
    let dir = scratch("missing", "tiny");
    let mut sd = StateDict::from_file(dir.join("model.safetensors")).unwrap();
    sd.tensors.remove("text_projection.weight");
    sd.tensors.remove("logit_scale");
    sd.save_safetensors(dir.join("model.safetensors")).unwrap();
    match load_flava_model(&dir, &Device::flex()).unwrap_err() {
        CheckpointError::Weights(WeightsError::Missing { keys }) => {
            assert_eq!(keys.len(), 2, "{keys:?}");
            assert!(keys.contains(&"text_projection.weight".to_string()) && keys.contains(&"logit_scale".to_string()));
        }
        other => panic!("expected missing keys, got {other}"),
    }
}

#[test]
fn missing_files_are_named() {
    let dir = scratch("nofiles", "tiny");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_flava_model(&dir, &Device::flex()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors or pytorch_model.bin"), "{err}");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_flava_model(&dir, &Device::flex()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn wrong_field_type_names_the_field() {
    let json = r#"{"image_config": {"hidden_size": "big"}, "projection_dim": 24}"#;
    match FlavaConfig::from_json_str(json, Path::new("config.json")).unwrap_err() {
        ConfigError::Field { field, .. } => assert_eq!(field, "image_config.hidden_size"),
        other => panic!("{other}"),
    }
    let json = r#"{"text_config": {"hidden_size": 30, "num_attention_heads": 4}}"#;
    let err = FlavaConfig::from_json_str(json, Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_config.hidden_size"), "{err}");
}

#[test]
fn hf_config_defaults_and_presets() {
    let full = FlavaConfig::from_json_str("{}", Path::new("config.json")).unwrap();
    assert_eq!(full, FlavaConfig::full());
    assert_eq!(
        (
            full.projection_dim,
            full.multimodal_config.num_hidden_layers,
            full.image_config.layer_norm_eps
        ),
        (768, 6, 1e-12)
    );
    assert!((full.logit_scale_init_value - 2.6592).abs() < 1e-12);
    let small = FlavaConfig::preset("small").unwrap();
    assert_eq!(
        (
            small.image_config.image_size,
            small.image_config.patch_size,
            small.image_config.hidden_size
        ),
        (64, 8, 256)
    );
    assert_eq!(
        (
            small.image_config.num_hidden_layers,
            small.text_config.num_hidden_layers,
            small.multimodal_config.num_hidden_layers
        ),
        (4, 4, 2)
    );
    assert!(FlavaConfig::preset("huge").is_err());
    // A config we write reads back equal.
    let back = FlavaConfig::from_json_str(&small.to_json_pretty("FlavaModel"), Path::new("x")).unwrap();
    assert_eq!(back, small);
}

#[test]
fn standalone_towers_load_from_their_own_and_from_flava_directories() {
    let device = Device::flex();
    let (img, cfg, report) = load_image_model(fixtures().join("tiny_image_model"), &device).unwrap();
    assert_eq!(cfg.hidden_size, 32);
    assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
    let (img2, _, _) = load_image_model(fixtures().join("tiny"), &device).unwrap();
    let px = Tensor::<4>::random([1, 3, 32, 32], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
    let a = img.forward(px.clone(), None, false, false).last_hidden_state;
    let b = img2.forward(px, None, false, false).last_hidden_state;
    assert_eq!(a.into_data(), b.into_data());
    let (_, tcfg, report) = load_text_model(fixtures().join("tiny_text_model"), &device).unwrap();
    assert_eq!((tcfg.hidden_size, tcfg.qkv_bias), (40, false));
    assert!(report.missing.is_empty(), "{report}");
    load_text_model(fixtures().join("tiny_pretraining"), &device).unwrap();
}

#[test]
fn convert_bin_to_safetensors_keeps_every_float_tensor() {
    let out = std::env::temp_dir().join(format!("flava-convert-{}.safetensors", std::process::id()));
    let input = fixtures().join("tiny_pretraining/pytorch_model.bin");
    let (n, ignored) = convert_to_safetensors(&input, &out).unwrap();
    let a = StateDict::from_file(&input).unwrap();
    let b = StateDict::from_file(&out).unwrap();
    assert_eq!(n, a.tensors.len());
    assert_eq!(ignored, vec!["flava.text_model.embeddings.position_ids".to_string()]);
    for (k, t) in &a.tensors {
        assert_eq!(t.shape, b.tensors[k].shape, "{k}");
        assert_eq!(t.data, b.tensors[k].data, "{k}");
    }
    std::fs::remove_file(out).ok();
}

/// Sizes that would allocate terabytes (or abort) are refused while the config is read.
#[test]
fn absurd_config_sizes_are_errors_before_anything_is_allocated() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny/config.json")).unwrap()).unwrap();
    for (tower, key, value, want) in [
        (
            "image_config",
            "num_hidden_layers",
            1_000_000_000u64,
            "num_hidden_layers",
        ),
        ("text_config", "hidden_size", 1 << 40, "hidden_size"),
        ("image_config", "image_size", 1 << 20, "parameters"),
    ] {
        let mut v = base.clone();
        v[tower][key] = serde_json::json!(value);
        if key == "hidden_size" {
            v[tower]["num_attention_heads"] = serde_json::json!(1);
        }
        let t0 = std::time::Instant::now();
        let e = FlavaConfig::from_json_str(&v.to_string(), Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains("limit"), "{tower}.{key}: {e}");
        assert!(t0.elapsed().as_millis() < 100);
    }
}

/// With NaN in one query weight, every output is NaN, as in transformers (its additive mask
/// and softmax propagate NaN); the non-finite guard of training can then see it.
#[test]
fn nan_in_an_attention_weight_propagates_as_in_pytorch() {
    let dir = scratch("nan-attn", "tiny");
    let path = dir.join("model.safetensors");
    let mut sd = StateDict::from_file(&path).unwrap();
    for key in [
        "image_model.encoder.layer.0.attention.attention.query.weight",
        "text_model.encoder.layer.0.attention.attention.key.weight",
    ] {
        sd.tensors.get_mut(key).unwrap().data[0] = f32::NAN;
    }
    sd.save_safetensors(&path).unwrap();
    let device = Device::flex();
    let m = load_flava_model(&dir, &device).unwrap();
    let size = m.config.image_config.image_size;
    let px = Tensor::<4>::random([2, 3, size, size], burn::tensor::Distribution::Default, &device);
    let img: Vec<f32> = m
        .model
        .image_features(px)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    assert!(img.iter().all(|v| v.is_nan()), "image features: {:?}", &img[..4]);
    // The key weight of the text tower, with padding in the batch (masked keys included).
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 5, 6, 3, 2, 7, 3, 0], [2, 4]), &device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 1, 1, 1, 1, 1, 1, 0], [2, 4]), &device);
    let txt: Vec<f32> = m
        .model
        .text_features(ids, Some(&mask))
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    assert!(txt.iter().all(|v| v.is_nan()), "text features: {:?}", &txt[..4]);
}

/// A weight stored with an integer dtype is named as such, not reported as missing.
#[test]
fn integer_dtype_weights_are_named_as_such() {
    let dir = scratch("int-dtype", "tiny");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let key = "image_model.embeddings.cls_token";
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            if k == key {
                let n: usize = v.shape().iter().product();
                (k, safetensors::Dtype::I64, v.shape().to_vec(), vec![0u8; 8 * n])
            } else {
                (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = load_flava_model(&dir, &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("non-float dtype") && e.contains(key), "{e}");
}
