//! Parity with Hugging Face transformers' `FlavaModel` on a tiny random model whose every weight
//! is perturbed (written by `scripts/make_fixtures.py`). Tolerance: max |Δ| ≤ 1e-4 on every output.

use std::path::PathBuf;

use burn::prelude::*;
use flava_fusion::checkpoint::{load_flava_model, save_flava_model};
use flava_fusion::{FlavaInput, FlavaModel};
use flava_vit::weights::{read_int_tensors, StateDict};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Io {
    f: StateDict,
    i: flava_vit::weights::IntTensors,
    device: Device,
}

impl Io {
    fn load() -> Self {
        let p = fixtures().join("tiny_io.safetensors");
        Self {
            f: StateDict::from_file(&p).unwrap(),
            i: read_int_tensors(&p).unwrap(),
            device: Device::flex(),
        }
    }
    fn float<const D: usize>(&self, k: &str) -> Tensor<D> {
        let t = self.f.get(k).unwrap_or_else(|| panic!("fixture {k}"));
        Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &self.device)
    }
    fn int(&self, k: &str) -> Tensor<2, Int> {
        let (s, v) = &self.i[k];
        Tensor::from_data(TensorData::new(v.clone(), s.clone()), &self.device)
    }
    fn bool(&self, k: &str) -> Tensor<2, Bool> {
        self.int(k).equal_elem(1)
    }
}

fn assert_close<const D: usize>(name: &str, got: Tensor<D>, want: Tensor<D>) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let diff = (got - want).abs().max().into_scalar::<f32>();
    eprintln!("{name}: max |diff| = {diff:.2e}");
    assert!(diff <= TOL, "{name}: max |diff| {diff:e} > {TOL:e}");
}

fn model(io: &Io) -> FlavaModel {
    let loaded = load_flava_model(fixtures().join("tiny"), &io.device).expect("load tiny");
    assert!(
        loaded.report.missing.is_empty() && loaded.report.unexpected.is_empty(),
        "{}",
        loaded.report
    );
    loaded.model
}

fn full_input(io: &Io, masked: bool) -> FlavaInput {
    FlavaInput {
        pixel_values: Some(io.float("pixel_values")),
        bool_masked_pos: masked.then(|| io.bool("bool_masked_pos")),
        input_ids: Some(io.int("input_ids")),
        attention_mask: Some(io.int("attention_mask")),
        token_type_ids: Some(io.int("token_type_ids")),
        output_hidden_states: true,
        ..Default::default()
    }
}

#[test]
fn towers_match_transformers() {
    let io = Io::load();
    let m = model(&io);
    let out = m.forward(full_input(&io, false));
    let (img, txt, mm) = (out.image.unwrap(), out.text.unwrap(), out.multimodal.unwrap());
    assert_close(
        "image last_hidden_state",
        img.last_hidden_state,
        io.float("image_last_hidden"),
    );
    assert_close("image pre-LN", img.pre_layernorm, io.float("image_pre_ln"));
    assert_close(
        "image embeddings (hidden_states[0])",
        img.hidden_states.unwrap()[0].clone(),
        io.float("image_first_hidden"),
    );
    assert_close("image pooler", img.pooler_output, io.float("image_pooler"));
    assert_close(
        "text last_hidden_state",
        txt.last_hidden_state,
        io.float("text_last_hidden"),
    );
    assert_close("text pre-LN", txt.pre_layernorm, io.float("text_pre_ln"));
    assert_close("text pooler", txt.pooler_output, io.float("text_pooler"));
    assert_close(
        "multimodal last_hidden_state",
        mm.last_hidden_state,
        io.float("mm_last_hidden"),
    );
    assert_close("multimodal pooler", mm.pooler_output, io.float("mm_pooler"));
}

#[test]
fn features_and_logits_match_transformers() {
    let io = Io::load();
    let m = model(&io);
    let img = m.image_features(io.float("pixel_values"));
    let txt = m.text_features(io.int("input_ids"), Some(&io.int("attention_mask")));
    // token_type_ids were non-zero in row 2 of the fixture: pass them through the full forward.
    let out = m.text_model.forward(
        io.int("input_ids"),
        Some(&io.int("attention_mask")),
        Some(io.int("token_type_ids")),
        false,
    );
    let txt_tt = m.project_cls(&m.text_projection, out.last_hidden_state);
    assert_close("image features", img.clone(), io.float("image_features"));
    assert_close("text features", txt_tt.clone(), io.float("text_features"));
    assert_close(
        "logits_per_image",
        m.contrastive_logits(img, txt_tt),
        io.float("logits_per_image"),
    );
    // Rows 0 and 1 have token type 0 everywhere, so the plain text_features path agrees there.
    assert_close(
        "text features (no token types)",
        txt.slice(s![0..2, ..]),
        io.float::<2>("text_features").slice(s![0..2, ..]),
    );
}

#[test]
fn masked_patches_match_transformers() {
    let io = Io::load();
    let m = model(&io);
    let out = m.forward(full_input(&io, true));
    assert_close(
        "masked image last_hidden_state",
        out.image.unwrap().last_hidden_state,
        io.float("masked_image_last_hidden"),
    );
    assert_close(
        "masked multimodal last_hidden_state",
        out.multimodal.unwrap().last_hidden_state,
        io.float("masked_mm_last_hidden"),
    );
}

#[test]
fn fusion_without_text_mask_matches_transformers() {
    let io = Io::load();
    let m = model(&io);
    let mut input = full_input(&io, false);
    input.attention_mask = None;
    input.token_type_ids = None;
    let out = m.forward(input);
    assert_close(
        "multimodal, no mask",
        out.multimodal.unwrap().last_hidden_state,
        io.float("nomask_mm_last_hidden"),
    );
}

#[test]
fn interpolated_position_embeddings_match_transformers() {
    let io = Io::load();
    let m = model(&io);
    for (px, want) in [
        ("pixel_values_48", "interp48_last_hidden"),
        ("pixel_values_32x48", "interp32x48_last_hidden"),
    ] {
        let out = m.image_model.forward(io.float(px), None, true, false);
        assert_close(want, out.last_hidden_state, io.float(want));
    }
}

#[test]
fn skip_multimodal_encoder_skips_fusion() {
    let io = Io::load();
    let m = model(&io);
    let mut input = full_input(&io, false);
    input.skip_multimodal_encoder = true;
    let out = m.forward(input);
    assert!(out.multimodal.is_none());
    assert_close(
        "image still computed",
        out.image.unwrap().last_hidden_state,
        io.float("image_last_hidden"),
    );
}

#[test]
fn pretraining_bin_layout_loads_with_heads_unused_and_int_buffers_ignored() {
    let io = Io::load();
    let loaded = load_flava_model(fixtures().join("tiny_pretraining"), &io.device).expect("load .bin");
    assert!(loaded.report.missing.is_empty(), "{}", loaded.report);
    // The heads and codebook of FlavaForPreTraining are reported, not loaded.
    assert!(
        loaded.report.unexpected.iter().any(|k| k.starts_with("mim_head.")),
        "{}",
        loaded.report
    );
    assert!(
        loaded
            .report
            .unexpected
            .iter()
            .any(|k| k.starts_with("image_codebook.")),
        "{}",
        loaded.report
    );
    assert!(
        loaded.report.unexpected.iter().all(|k| !k.starts_with("flava.")),
        "{}",
        loaded.report
    );
    let img = loaded.model.image_features(io.float("pixel_values"));
    assert_close("image features from .bin", img, io.float("image_features"));
    let sd = StateDict::from_file(fixtures().join("tiny_pretraining/pytorch_model.bin")).unwrap();
    assert_eq!(sd.ignored, vec!["flava.text_model.embeddings.position_ids".to_string()]);
    assert_eq!(sd.get("flava.logit_scale").unwrap().shape, Vec::<usize>::new());
}

#[test]
fn saved_model_has_hf_keys_and_reloads_identically() {
    let io = Io::load();
    let m = model(&io);
    // FLAVA_KEEP_SAVED=DIR keeps the saved model for scripts/check_hf_load.py.
    let keep = std::env::var_os("FLAVA_KEEP_SAVED").map(PathBuf::from);
    let dir = keep
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("flava-save-{}", std::process::id())));
    let cfg = flava_fusion::checkpoint::read_config(&fixtures().join("tiny")).unwrap();
    save_flava_model(&m, &cfg, &dir).unwrap();
    // Same key set and shapes as the file transformers wrote.
    let ours = StateDict::from_file(dir.join("model.safetensors")).unwrap();
    let theirs = StateDict::from_file(fixtures().join("tiny/model.safetensors")).unwrap();
    let shapes = |sd: &StateDict| {
        sd.tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(shapes(&ours), shapes(&theirs));
    for (k, t) in &theirs.tensors {
        let diff = t
            .data
            .iter()
            .zip(&ours.tensors[k].data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert_eq!(diff, 0.0, "{k} changed on save");
    }
    let back = load_flava_model(&dir, &io.device).unwrap().model;
    assert_close(
        "reloaded features",
        back.image_features(io.float("pixel_values")),
        io.float("image_features"),
    );
    if keep.is_none() {
        std::fs::remove_dir_all(&dir).ok();
    }
}
