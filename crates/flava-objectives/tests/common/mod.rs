//! Fixture access shared by the objectives tests.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::prelude::*;
use flava_objectives::{MlmTargets, PretrainingBatch};
use flava_vit::weights::{read_int_tensors, IntTensors, StateDict};

pub const TOL: f32 = 1e-4;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub struct Io {
    pub f: StateDict,
    pub i: IntTensors,
    pub device: Device,
}

impl Io {
    pub fn load() -> Self {
        let p = fixtures().join("pretraining_io.safetensors");
        Self {
            f: StateDict::from_file(&p).unwrap(),
            i: read_int_tensors(&p).unwrap(),
            device: Device::flex().autodiff(),
        }
    }
    pub fn has(&self, k: &str) -> bool {
        self.f.get(k).is_some() || self.i.contains_key(k)
    }
    pub fn float<const D: usize>(&self, k: &str) -> Tensor<D> {
        let t = self.f.get(k).unwrap_or_else(|| panic!("fixture {k}"));
        let shape = if D == 1 { vec![t.data.len()] } else { t.shape.clone() };
        Tensor::from_data(TensorData::new(t.data.clone(), shape), &self.device)
    }
    pub fn ints(&self, k: &str) -> Vec<i64> {
        self.i[k].1.clone()
    }
    pub fn int2(&self, k: &str) -> Tensor<2, Int> {
        let (s, v) = &self.i[k];
        Tensor::from_data(TensorData::new(v.clone(), s.clone()), &self.device)
    }
    pub fn batch(&self, name: &str) -> PretrainingBatch {
        let k = |f: &str| format!("{name}.input.{f}");
        let opt_int = |f: &str| self.has(&k(f)).then(|| self.int2(&k(f)));
        PretrainingBatch {
            pixel_values: self.has(&k("pixel_values")).then(|| self.float(&k("pixel_values"))),
            codebook_pixel_values: self
                .has(&k("codebook_pixel_values"))
                .then(|| self.float(&k("codebook_pixel_values"))),
            bool_masked_pos: opt_int("bool_masked_pos").map(|t| t.equal_elem(1)),
            mim_targets: None,
            input_ids: opt_int("input_ids"),
            input_ids_masked: opt_int("input_ids_masked"),
            attention_mask: opt_int("attention_mask"),
            token_type_ids: None,
            mlm: self
                .has(&k("mlm_labels"))
                .then(|| MlmTargets::from_labels(&self.ints(&k("mlm_labels")), -100)),
            itm_labels: self
                .has(&k("itm_labels"))
                .then(|| self.ints(&k("itm_labels")).iter().map(|&x| x as usize).collect()),
        }
    }
}

/// Rows `a..b` of a batch (every tensor, the MLM positions re-based, the ITM labels).
pub fn slice_batch(batch: &PretrainingBatch, a: usize, b: usize) -> PretrainingBatch {
    let s4 = |t: &Option<Tensor<4>>| t.clone().map(|t| t.slice(s![a..b, .., .., ..]));
    let s2i = |t: &Option<Tensor<2, Int>>| t.clone().map(|t| t.slice(s![a..b, ..]));
    let seq = batch
        .input_ids_masked
        .as_ref()
        .or(batch.input_ids.as_ref())
        .map_or(1, |t| t.dims()[1]);
    PretrainingBatch {
        pixel_values: s4(&batch.pixel_values),
        codebook_pixel_values: s4(&batch.codebook_pixel_values),
        bool_masked_pos: batch.bool_masked_pos.clone().map(|t| t.slice(s![a..b, ..])),
        mim_targets: s2i(&batch.mim_targets),
        input_ids: s2i(&batch.input_ids),
        input_ids_masked: s2i(&batch.input_ids_masked),
        attention_mask: s2i(&batch.attention_mask),
        token_type_ids: s2i(&batch.token_type_ids),
        mlm: batch.mlm.as_ref().map(|m| {
            let (positions, targets) = m
                .positions
                .iter()
                .zip(&m.targets)
                .filter(|(&p, _)| p / seq >= a && p / seq < b)
                .map(|(&p, &t)| (p - a * seq, t))
                .unzip();
            MlmTargets { positions, targets }
        }),
        itm_labels: batch.itm_labels.as_ref().map(|l| l[a..b].to_vec()),
    }
}
