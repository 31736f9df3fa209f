//! Parity with transformers' `FlavaForPreTraining` (train mode, every weight perturbed,
//! logit_scale above ln 100 so the clamp is exercised), fixtures from `scripts/make_fixtures.py`:
//! a paired batch (one ITM negative, one padded caption), the same batch with no positive pair,
//! an image-only and a text-only batch, MIM targets from the codebook inside the checkpoint.
//! Tolerances: losses and logits max |Δ| ≤ 1e-4; gradients max |Δ| ≤ 1e-4 · max(1, max |g_ref|).

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::Gradients;
use flava_objectives::checkpoint::{load_pretraining, save_pretraining};
use flava_objectives::{FlavaForPretraining, MlmTargets, PretrainingOutput, StepOptions};

mod common;

use common::{fixtures, Io, TOL};

fn max_abs<const D: usize>(t: Tensor<D>) -> f32 {
    t.abs().max().into_scalar::<f32>()
}

fn assert_close<const D: usize>(name: &str, got: Tensor<D>, want: Tensor<D>, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let diff = max_abs(got.without_autodiff() - want.without_autodiff());
    eprintln!("{name}: max |diff| = {diff:.2e}");
    assert!(diff <= tol, "{name}: max |diff| {diff:e} > {tol:e}");
}

fn load(io: &Io) -> (FlavaForPretraining, flava_dvae::ImageCodebook) {
    let loaded = load_pretraining(fixtures().join("pretraining"), false, &io.device).expect("load pretraining");
    assert!(loaded.report.missing.is_empty(), "{}", loaded.report);
    assert!(loaded.report.unexpected.is_empty(), "{}", loaded.report);
    (loaded.model, loaded.codebook.expect("codebook in the checkpoint"))
}

fn check_outputs(io: &Io, name: &str, out: &PretrainingOutput) {
    let l = &out.losses;
    let pairs = [
        ("mim", &l.mim),
        ("mlm", &l.mlm),
        ("itm", &l.itm),
        ("global_contrastive", &l.global_contrastive),
        ("mmm_image", &l.mmm_image),
        ("mmm_text", &l.mmm_text),
    ];
    for (loss, got) in pairs {
        let key = format!("{name}.loss.{loss}");
        assert_eq!(got.is_some(), io.has(&key), "{key}: present here vs in HF");
        if let Some(g) = got {
            assert_close(&key, g.clone(), io.float::<1>(&key), TOL);
        }
    }
    let total = out.total.clone().expect("total");
    assert_close(
        &format!("{name}.loss.total"),
        total,
        io.float::<1>(&format!("{name}.loss.total")),
        TOL,
    );
    let lg = &out.logits;
    let logits = [
        ("mim_logits", &lg.mim),
        ("mlm_logits", &lg.mlm),
        ("itm_logits", &lg.itm),
        ("mmm_image_logits", &lg.mmm_image),
        ("mmm_text_logits", &lg.mmm_text),
        ("contrastive_logits_per_image", &lg.contrastive_per_image),
        ("contrastive_logits_per_text", &lg.contrastive_per_text),
    ];
    for (k, got) in logits {
        let key = format!("{name}.{k}");
        assert_eq!(got.is_some(), io.has(&key), "{key}: present here vs in HF");
        if let Some(g) = got {
            assert_close(&key, g.clone(), io.float::<2>(&key), TOL);
        }
    }
    if let Some(t) = &out.mim_targets {
        let want: Vec<usize> = io
            .ints(&format!("{name}.mim_targets"))
            .iter()
            .map(|&x| x as usize)
            .collect();
        assert_eq!(t, &want, "{name}: codebook targets");
    }
}

/// Gradient of a parameter in PyTorch layout.
fn grad<const D: usize>(p: &Param<Tensor<D>>, g: &Gradients) -> Option<Tensor<D>> {
    p.val().grad(g)
}

fn linear_grad(l: &Linear, g: &Gradients) -> Option<Tensor<2>> {
    grad(&l.weight, g).map(|t| t.transpose())
}

fn check_grads(io: &Io, name: &str, model: &FlavaForPretraining, g: &Gradients) {
    let f = &model.flava;
    let (im, tm, mm) = (&f.image_model, &f.text_model, &f.multimodal_model);
    let as2 = |t: Option<Tensor<3>>| t.map(|t| t.flatten::<2>(0, 1));
    let got: Vec<(&str, Option<Tensor<2>>)> = vec![
        ("flava.logit_scale", grad(&f.logit_scale, g).map(|t| t.reshape([1, 1]))),
        (
            "flava.image_model.encoder.layer.0.attention.attention.query.weight",
            linear_grad(&im.encoder.layer[0].attention.attention.query, g),
        ),
        (
            "flava.image_model.embeddings.cls_token",
            as2(grad(&im.embeddings.cls_token, g)),
        ),
        (
            "flava.image_model.embeddings.mask_token",
            as2(im.embeddings.mask_token.as_ref().and_then(|p| grad(p, g))),
        ),
        (
            "flava.text_model.encoder.layer.1.output.dense.weight",
            linear_grad(&tm.encoder.layer[1].output.dense, g),
        ),
        (
            "flava.text_model.embeddings.word_embeddings.weight",
            grad(&tm.embeddings.word_embeddings.weight, g),
        ),
        (
            "flava.multimodal_model.encoder.layer.0.intermediate.dense.weight",
            linear_grad(&mm.encoder.layer[0].intermediate.dense, g),
        ),
        (
            "flava.multimodal_model.cls_token",
            as2(mm.cls_token.as_ref().and_then(|p| grad(p, g))),
        ),
        ("flava.image_projection.weight", linear_grad(&f.image_projection, g)),
        ("flava.text_projection.weight", linear_grad(&f.text_projection, g)),
        (
            "flava.image_to_mm_projection.weight",
            linear_grad(&f.image_to_mm_projection, g),
        ),
        (
            "flava.text_to_mm_projection.weight",
            linear_grad(&f.text_to_mm_projection, g),
        ),
        (
            "mim_head.transform.dense.weight",
            linear_grad(&model.mim_head.transform.dense, g),
        ),
        (
            "mim_head.decoder.bias",
            model
                .mim_head
                .decoder
                .bias
                .as_ref()
                .and_then(|b| grad(b, g))
                .map(|t| t.unsqueeze()),
        ),
        (
            "mlm_head.transform.LayerNorm.weight",
            grad(&model.mlm_head.transform.layer_norm.gamma, g).map(|t| t.unsqueeze()),
        ),
        ("mlm_head.decoder.weight", linear_grad(&model.mlm_head.decoder, g)),
        (
            "mmm_image_head.decoder.weight",
            linear_grad(&model.mmm_image_head.decoder, g),
        ),
        (
            "mmm_image_head.transform.dense.bias",
            model
                .mmm_image_head
                .transform
                .dense
                .bias
                .as_ref()
                .and_then(|b| grad(b, g))
                .map(|t| t.unsqueeze()),
        ),
        (
            "mmm_text_head.transform.dense.weight",
            linear_grad(&model.mmm_text_head.transform.dense, g),
        ),
        (
            "mmm_text_head.decoder.bias",
            model
                .mmm_text_head
                .decoder
                .bias
                .as_ref()
                .and_then(|b| grad(b, g))
                .map(|t| t.unsqueeze()),
        ),
        (
            "itm_head.pooler.dense.weight",
            linear_grad(&model.itm_head.pooler.dense, g),
        ),
        (
            "itm_head.seq_relationship.weight",
            linear_grad(&model.itm_head.seq_relationship, g),
        ),
    ];
    let mut checked = 0;
    for (key, got) in got {
        let fkey = format!("{name}.grad.{key}");
        if !io.has(&fkey) {
            // HF's gradient is absent or zero: ours must be too.
            if let Some(t) = got {
                assert!(max_abs(t) == 0.0, "{fkey}: gradient here but none in HF");
            }
            continue;
        }
        let got = got.unwrap_or_else(|| panic!("{fkey}: no gradient here"));
        let want = io.float::<1>(&fkey).without_autodiff().reshape(got.dims());
        let scale = max_abs(want.clone()).max(1.0);
        assert_close(&fkey, got, want, TOL * scale);
        checked += 1;
    }
    assert!(checked >= 4, "{name}: only {checked} gradients compared");
}

fn run(io: &Io, model: &FlavaForPretraining, codebook: &flava_dvae::ImageCodebook, name: &str) {
    let batch = io.batch(name);
    let opts = StepOptions {
        codebook: Some(codebook),
        ..Default::default()
    };
    let out = model.forward(&batch, &opts).expect("step");
    check_outputs(io, name, &out);
    let grads = out.total.clone().expect("total").backward();
    check_grads(io, name, model, &grads);
}

#[test]
fn paired_batch_matches_hf() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    run(&io, &model, &codebook, "pairs");
}

#[test]
fn paired_batch_without_positive_uses_every_row() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    run(&io, &model, &codebook, "pairs_allneg");
}

#[test]
fn image_only_batch_matches_hf() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    run(&io, &model, &codebook, "images");
}

#[test]
fn text_only_batch_matches_hf() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    run(&io, &model, &codebook, "text");
}

#[test]
fn given_targets_replace_the_codebook_and_missing_ones_are_an_error() {
    let io = Io::load();
    let (model, _) = load(&io);
    let mut batch = io.batch("images");
    let err = model.forward(&batch, &StepOptions::default()).unwrap_err();
    assert!(err.to_string().contains("targets"), "{err}");
    batch.mim_targets = Some(io.int2("images.mim_targets"));
    let out = model.forward(&batch, &StepOptions::default()).unwrap();
    assert_close(
        "images.loss.mim (given targets)",
        out.losses.mim.unwrap(),
        io.float::<1>("images.loss.mim"),
        TOL,
    );
}

#[test]
fn no_masked_position_skips_the_loss_instead_of_nan() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    let mut batch = io.batch("text");
    batch.mlm = Some(MlmTargets::default());
    let out = model.forward(&batch, &StepOptions::default()).unwrap();
    assert!(out.losses.mlm.is_none() && out.total.is_none());
    let mut batch = io.batch("images");
    batch.bool_masked_pos = batch
        .bool_masked_pos
        .map(|m| Tensor::<2, Int>::zeros(m.dims(), &io.device).equal_elem(1));
    let opts = StepOptions {
        codebook: Some(&codebook),
        ..Default::default()
    };
    let out = model.forward(&batch, &opts).unwrap();
    assert!(out.losses.mim.is_none());
}

#[test]
fn saved_checkpoint_reloads_identically() {
    let io = Io::load();
    let device = Device::flex();
    let loaded = load_pretraining(fixtures().join("pretraining"), false, &device).unwrap();
    let dir = std::env::temp_dir().join(format!("flava-objectives-save-{}", std::process::id()));
    save_pretraining(&loaded.model, loaded.codebook.as_ref(), &loaded.config, &dir).unwrap();
    let again = load_pretraining(&dir, false, &io.device).unwrap();
    assert!(again.report.missing.is_empty() && again.report.unexpected.is_empty());
    let (model, codebook) = (again.model, again.codebook.unwrap());
    let out = model
        .forward(
            &io.batch("pairs"),
            &StepOptions {
                codebook: Some(&codebook),
                ..Default::default()
            },
        )
        .unwrap();
    check_outputs(&io, "pairs", &out);
    std::fs::remove_dir_all(dir).ok();
}

/// Bad host-side targets are errors naming what is wrong, not panics in a kernel: an MLM target
/// past the text vocabulary (a tokenizer that is not the model's), an MLM position past the
/// batch, an ITM label that is not 0/1, and the contrastive embeddings of a text-only batch.
#[test]
fn bad_targets_are_errors_not_panics() {
    let io = Io::load();
    let (model, codebook) = load(&io);
    let opts = StepOptions {
        codebook: Some(&codebook),
        ..Default::default()
    };
    let good = io.batch("pairs");
    let vocab = model.mlm_head.decoder.weight.dims()[1];
    let mlm = good.mlm.clone().expect("the paired fixture has MLM targets");
    type Edit<'a> = Box<dyn Fn(&mut flava_objectives::PretrainingBatch) + 'a>;
    let cases: [(&str, Edit); 3] = [
        (
            "outside the text vocabulary",
            Box::new(|b| {
                b.mlm = Some(MlmTargets {
                    targets: vec![vocab + 7; mlm.targets.len()],
                    ..mlm.clone()
                })
            }),
        ),
        (
            "outside the batch",
            Box::new(|b| {
                b.mlm = Some(MlmTargets {
                    positions: vec![1_000_000; mlm.positions.len()],
                    ..mlm.clone()
                })
            }),
        ),
        (
            "is not 0 or 1",
            Box::new(|b| b.itm_labels = b.itm_labels.clone().map(|l| l.iter().map(|_| 2).collect())),
        ),
    ];
    for (want, edit) in cases {
        let mut b = good.clone();
        edit(&mut b);
        let Err(e) = model.forward(&b, &opts) else {
            panic!("{want}: no error")
        };
        let e = e.to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let text_only = io.batch("text");
    let Err(e) = model.contrastive_embeddings(&text_only) else {
        panic!("no error for a text-only batch")
    };
    let e = e.to_string();
    assert!(e.contains("paired batch"), "{e}");
}
