//! Parity of the task heads with a PyTorch reference: transformers' `FlavaModel` (the tiny
//! fixture model) and torchmultimodal's classifier layout on the CLS of the image, text and
//! multimodal encoders (`scripts/make_classification_fixtures.py`): logits, cross-entropy,
//! soft-score BCE (VQA), MSE (one output), and gradients of the head and of backbone weights.
//! Tolerances: logits and losses max |Δ| ≤ 1e-4; gradients max |Δ| ≤ 1e-4 · max(1, max |g_ref|).
//! Also: the checkpoint layout (`classifier.model.0/3.*` beside HF backbone keys) round-trips.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Gradients;
use flava_fusion::checkpoint::load_flava_model;
use flava_fusion::{FlavaInput, Tower};
use flava_objectives::{ClassifierConfig, FlavaForClassification, TaskTargets};
use flava_vit::weights::{read_int_tensors, IntTensors, StateDict};

mod common;

use common::{fixtures, TOL};

struct Fixture {
    f: StateDict,
    inputs: IntTensors,
    io: StateDict,
    device: Device,
}

impl Fixture {
    fn load() -> Self {
        Self {
            f: StateDict::from_file(fixtures().join("classification_io.safetensors")).unwrap(),
            inputs: read_int_tensors(fixtures().join("tiny_io.safetensors")).unwrap(),
            io: StateDict::from_file(fixtures().join("tiny_io.safetensors")).unwrap(),
            device: Device::flex().autodiff(),
        }
    }
    fn float<const D: usize>(&self, sd: &StateDict, k: &str) -> Tensor<D> {
        let t = sd.get(k).unwrap_or_else(|| panic!("fixture {k}"));
        let shape = if D == 1 { vec![t.data.len()] } else { t.shape.clone() };
        Tensor::from_data(TensorData::new(t.data.clone(), shape), &self.device)
    }
    fn int2(&self, k: &str) -> Tensor<2, Int> {
        let (s, v) = &self.inputs[k];
        Tensor::from_data(TensorData::new(v.clone(), s.clone()), &self.device)
    }
    fn input(&self) -> FlavaInput {
        FlavaInput {
            pixel_values: Some(self.float(&self.io, "pixel_values")),
            input_ids: Some(self.int2("input_ids")),
            attention_mask: Some(self.int2("attention_mask")),
            token_type_ids: Some(self.int2("token_type_ids")),
            ..Default::default()
        }
    }
    /// The tiny model with the fixture's head for `prefix` (`image.`, `regression.`, ...).
    fn model(&self, tower: Tower, prefix: &str, classes: usize) -> FlavaForClassification {
        let loaded = load_flava_model(fixtures().join("tiny"), &self.device).unwrap();
        let head = ClassifierConfig {
            tower,
            num_classes: classes,
            hidden_size: 16,
            dropout: 0.0,
        };
        let mut m = FlavaForClassification::new(loaded.model, &loaded.config, &head, &self.device);
        let mut sd = m.state_dict();
        let mut n = 0;
        for (k, t) in &self.f.tensors {
            if let Some(rest) = k.strip_prefix(prefix).filter(|r| r.starts_with("classifier.")) {
                sd.tensors.insert(rest.to_string(), t.clone());
                n += 1;
            }
        }
        assert_eq!(n, 4, "{prefix}: head tensors in the fixture");
        let (backbone, head) = m.load_state_dict(&sd).unwrap();
        assert!(
            backbone.missing.is_empty() && head.missing.is_empty(),
            "{backbone} / {head}"
        );
        m
    }
}

fn assert_close<const D: usize>(name: &str, got: Tensor<D>, want: Tensor<D>, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let diff = (got.without_autodiff() - want.without_autodiff())
        .abs()
        .max()
        .into_scalar::<f32>();
    eprintln!("{name}: max |diff| = {diff:.2e}");
    assert!(diff <= tol, "{name}: max |diff| {diff:e} > {tol:e}");
}

fn grad<const D: usize>(p: &Param<Tensor<D>>, g: &Gradients) -> Tensor<D> {
    p.val().grad(g).expect("a gradient")
}

fn linear_grad(l: &Linear, g: &Gradients) -> Tensor<2> {
    grad(&l.weight, g).transpose()
}

fn check_grad(fx: &Fixture, key: &str, got: Tensor<2>) {
    let t = fx.f.get(key).unwrap_or_else(|| panic!("fixture {key}"));
    let want = Tensor::<2>::from_data(TensorData::new(t.data.clone(), got.dims()), &fx.device);
    let scale = want.clone().abs().max().into_scalar::<f32>().max(1.0);
    assert_close(key, got, want, TOL * scale);
}

fn labels() -> Vec<usize> {
    let ints = read_int_tensors(fixtures().join("classification_io.safetensors")).unwrap();
    ints["labels"].1.iter().map(|&x| x as usize).collect()
}

#[test]
fn every_tower_head_matches_the_pytorch_reference() {
    let fx = Fixture::load();
    let targets = TaskTargets::Classes(labels());
    for tower in Tower::ALL {
        let p = format!("{tower}.");
        let m = fx.model(tower, &p, 5);
        let logits = m.forward(fx.input()).unwrap();
        assert_close(
            &format!("{p}logits"),
            logits.clone(),
            fx.float(&fx.f, &format!("{p}logits")),
            TOL,
        );
        let loss = FlavaForClassification::loss(logits, &targets).unwrap();
        assert_close(
            &format!("{p}loss.ce"),
            loss.clone(),
            fx.float(&fx.f, &format!("{p}loss.ce")),
            TOL,
        );
        let g = loss.backward();
        let (f, c) = (&m.flava, &m.classifier);
        check_grad(
            &fx,
            &format!("{p}grad.classifier.model.0.weight"),
            linear_grad(c.hidden.as_ref().expect("hidden layer"), &g),
        );
        let bias = c.output.bias.as_ref().expect("bias");
        check_grad(
            &fx,
            &format!("{p}grad.classifier.model.3.bias"),
            grad(bias, &g).reshape([1, 5]),
        );
        let im = &f.image_model;
        let tm = &f.text_model;
        let mm = &f.multimodal_model;
        let backbone: Vec<(&str, Tensor<2>)> = match tower {
            Tower::Image => vec![
                (
                    "image_model.encoder.layer.0.attention.attention.query.weight",
                    linear_grad(&im.encoder.layer[0].attention.attention.query, &g),
                ),
                (
                    "image_model.embeddings.cls_token",
                    grad(&im.embeddings.cls_token, &g).flatten::<2>(0, 1),
                ),
            ],
            Tower::Text => vec![
                (
                    "text_model.encoder.layer.1.output.dense.weight",
                    linear_grad(&tm.encoder.layer[1].output.dense, &g),
                ),
                (
                    "text_model.embeddings.word_embeddings.weight",
                    grad(&tm.embeddings.word_embeddings.weight, &g),
                ),
            ],
            Tower::Multimodal => vec![
                (
                    "image_model.encoder.layer.0.attention.attention.query.weight",
                    linear_grad(&im.encoder.layer[0].attention.attention.query, &g),
                ),
                (
                    "text_model.encoder.layer.1.output.dense.weight",
                    linear_grad(&tm.encoder.layer[1].output.dense, &g),
                ),
                (
                    "multimodal_model.encoder.layer.0.intermediate.dense.weight",
                    linear_grad(&mm.encoder.layer[0].intermediate.dense, &g),
                ),
                (
                    "multimodal_model.cls_token",
                    grad(mm.cls_token.as_ref().expect("cls token"), &g).flatten::<2>(0, 1),
                ),
                (
                    "text_to_mm_projection.weight",
                    linear_grad(&f.text_to_mm_projection, &g),
                ),
            ],
        };
        for (name, got) in backbone {
            check_grad(&fx, &format!("{p}grad.{name}"), got);
        }
    }
}

#[test]
fn vqa_soft_scores_and_regression_match_the_pytorch_reference() {
    let fx = Fixture::load();
    let m = fx.model(Tower::Multimodal, "multimodal.", 5);
    let logits = m.forward(fx.input()).unwrap();
    let soft = TaskTargets::Soft(fx.f.get("soft_scores").expect("soft scores").data.clone());
    let bce = FlavaForClassification::loss(logits, &soft).unwrap();
    assert_close("multimodal.loss.bce", bce, fx.float(&fx.f, "multimodal.loss.bce"), TOL);
    let reg = fx.model(Tower::Multimodal, "regression.", 1);
    let out = reg.forward(fx.input()).unwrap();
    assert_close(
        "regression.logits",
        out.clone(),
        fx.float(&fx.f, "regression.logits"),
        TOL,
    );
    let values = fx.f.get("values").expect("values").data.clone();
    let mse = FlavaForClassification::loss(out, &TaskTargets::Values(values)).unwrap();
    assert_close("regression.loss.mse", mse, fx.float(&fx.f, "regression.loss.mse"), TOL);
}

#[test]
fn the_checkpoint_keeps_hf_backbone_keys_and_torchmultimodal_head_keys() {
    let fx = Fixture::load();
    let m = fx.model(Tower::Text, "text.", 5);
    let sd = m.state_dict();
    for k in [
        "classifier.model.0.weight",
        "classifier.model.0.bias",
        "classifier.model.3.weight",
        "classifier.model.3.bias",
        "text_model.embeddings.word_embeddings.weight",
        "logit_scale",
    ] {
        assert!(
            sd.get(k).is_some(),
            "{k} missing from {:?}",
            sd.tensors.keys().take(5).collect::<Vec<_>>()
        );
    }
    assert!(
        sd.tensors
            .keys()
            .filter(|k| k.starts_with("classifier."))
            .all(|k| k.starts_with("classifier.model.0.") || k.starts_with("classifier.model.3.")),
        "head keys in torchmultimodal's layout"
    );
    // Saved and reloaded into a fresh head: the same logits.
    let loaded = load_flava_model(fixtures().join("tiny"), &fx.device).unwrap();
    let head = ClassifierConfig {
        tower: Tower::Text,
        num_classes: 5,
        hidden_size: 16,
        dropout: 0.0,
    };
    let mut again = FlavaForClassification::new(loaded.model, &loaded.config, &head, &fx.device);
    again.load_state_dict(&sd).unwrap();
    let a = m.forward(fx.input()).unwrap();
    let b = again.forward(fx.input()).unwrap();
    assert_close("reloaded logits", b, a.clone(), 0.0);
    // A pretraining-style `flava.` prefix on the backbone loads too.
    let mut prefixed = StateDict::default();
    for (k, t) in &sd.tensors {
        let k = if k.starts_with("classifier.") {
            k.clone()
        } else {
            format!("flava.{k}")
        };
        prefixed.tensors.insert(k, t.clone());
    }
    let mut third = FlavaForClassification::new(
        load_flava_model(fixtures().join("tiny"), &fx.device).unwrap().model,
        &loaded.config,
        &head,
        &fx.device,
    );
    third.load_state_dict(&prefixed).unwrap();
    assert_close("flava.-prefixed logits", third.forward(fx.input()).unwrap(), a, 0.0);
    // The wrong input for the tower is an error, not a panic.
    let image_head = fx.model(Tower::Image, "image.", 5);
    let err = image_head
        .forward(FlavaInput {
            input_ids: Some(fx.int2("input_ids")),
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("pixel_values"), "{err}");
}
