//! The evaluation at the end of a pretraining run, on the sources of its `[eval]` settings:
//! zero-shot classification, retrieval, MLM and MIM accuracy (the metrics are in [`crate::eval`]).

use burn::prelude::*;
use flava_data::batch::BatchBuilder;
use flava_data::processor::ImageProcessor;
use flava_data::spec::open_source;
use flava_data::task::Task;
use flava_dvae::dvae::Dvae;
use flava_dvae::ImageCodebook;
use flava_fusion::FlavaConfig;
use flava_objectives::FlavaForPretraining;
use flava_text::Tokenizer;

use super::config::PretrainConfig;
use super::setup::source_options;
use crate::eval::{self, EvalReport};
use crate::report::{self, ReportData};

/// The evaluation of a trained model (zero-shot, retrieval, MLM/MIM accuracy), and the
/// report's examples from it (confusion matrix, retrieval queries; MIM targets, masks and, with
/// the run's `dvae`, reconstructions of held-out images).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &FlavaForPretraining,
    codebook: &ImageCodebook,
    dvae: Option<&Dvae>,
    tokenizer: &Tokenizer,
    processor: &ImageProcessor,
    builder: &BatchBuilder,
    mc: &FlavaConfig,
    cfg: &PretrainConfig,
    device: &Device,
) -> anyhow::Result<(EvalReport, ReportData)> {
    let opts = source_options(cfg, false);
    let mut zs_src = open_source(&cfg.eval.zero_shot, Task::Images, &opts)?;
    let (zs_samples, skipped) = eval::read_samples(zs_src.as_mut(), Task::Images, cfg.eval.zero_shot_images);
    if zs_samples.is_empty() {
        anyhow::bail!(
            "evaluation: {} has no usable image ({skipped} skipped)",
            cfg.eval.zero_shot
        );
    }
    let zero_shot = eval::zero_shot(
        &model.flava,
        tokenizer,
        processor,
        &zs_samples,
        &cfg.eval.templates,
        None,
        cfg.max_length,
        device,
    )?;
    let mut r_src = open_source(&cfg.eval.retrieval, Task::Pairs, &opts)?;
    let (pairs, skipped) = eval::read_samples(r_src.as_mut(), Task::Pairs, cfg.eval.retrieval_pairs);
    if pairs.is_empty() {
        anyhow::bail!(
            "evaluation: {} has no usable pair ({skipped} skipped)",
            cfg.eval.retrieval
        );
    }
    let retrieval = eval::retrieval(&model.flava, tokenizer, processor, &pairs, cfg.max_length, device)?;
    let mut masked = [0.0f64; 2];
    let mut held_out_images = Vec::new();
    for (acc, (spec, task)) in masked
        .iter_mut()
        .zip([(&cfg.eval.text, Task::Text), (&cfg.eval.images, Task::Images)])
    {
        let mut src = open_source(spec, task, &opts)?;
        let (samples, _) = eval::read_samples(src.as_mut(), task, cfg.eval.masked_samples);
        *acc = eval::masked_accuracy(model, codebook, builder, &samples, task, device)?;
        if task == Task::Images {
            held_out_images = samples;
        }
    }
    let [mlm, mim] = masked;
    let chance = eval::chance_levels(
        Some(zero_shot.classes.len()),
        Some(&retrieval),
        mc.text_config.vocab_size,
        mc.image_config.vocab_size,
    );
    let report = EvalReport {
        zero_shot: Some(zero_shot),
        retrieval: Some(retrieval),
        mlm_accuracy: Some(mlm),
        mim_accuracy: Some(mim),
        chance,
    };
    let mut examples = ReportData::default();
    report::examples::from_eval(&report, &mut examples)?;
    examples.mim = report::examples::mim(&held_out_images, builder, codebook, dvae, device)?;
    if dvae.is_none() {
        examples.notes.push(
            "no dVAE decoder with this codebook (it was given, not trained by the run): reconstructions not shown"
                .into(),
        );
    }
    Ok((report, examples))
}
