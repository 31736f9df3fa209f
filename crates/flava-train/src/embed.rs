//! `flava embed`: image and text features and their contrastive logits from a pretrained model.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::*;
use flava_data::processor::{load_image, ImageProcessor};
use flava_fusion::{load_flava_model, FlavaModel};
use flava_objectives::checkpoint::load_pretraining;
use flava_objectives::ItmHead;
use flava_text::Tokenizer;
use flava_vit::encoder::EncoderOutput;
use serde::Serialize;

/// What `flava embed --json` prints.
#[derive(Debug, Serialize, PartialEq)]
pub struct EmbedOutput {
    /// `[n_images][projection_dim]` unnormalised projections of the image CLS token.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image_features: Vec<Vec<f32>>,
    /// `[n_texts][projection_dim]` unnormalised projections of the text CLS token.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub text_features: Vec<Vec<f32>>,
    /// `[n_images][n_texts]` `exp(logit_scale) · cos`, when both are given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits_per_image: Option<Vec<Vec<f32>>>,
    /// `[n_images][n_texts]` softmax probability of "matching" from the ITM head on the fusion
    /// encoder's output for each (unmasked) pair, with `--itm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itm_match_probability: Option<Vec<Vec<f32>>>,
    /// Indices of texts that were cut to the maximum length.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub truncated_texts: Vec<usize>,
}

fn rows(t: Tensor<2>) -> Vec<Vec<f32>> {
    let [n, d] = t.dims();
    let v = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
    (0..n).map(|i| v[i * d..(i + 1) * d].to_vec()).collect()
}

/// Finds the tokenizer of a model directory: `tokenizer.json`, else `vocab.txt`.
pub fn find_tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    for name in ["tokenizer.json", "vocab.txt"] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(Tokenizer::from_file(&p)?);
        }
    }
    anyhow::bail!("{}: no tokenizer.json or vocab.txt", dir.display())
}

/// Finds the image processor of a model directory; HF defaults when it has none.
pub fn find_processor(dir: &Path) -> anyhow::Result<ImageProcessor> {
    let p = dir.join("preprocessor_config.json");
    if p.is_file() {
        Ok(ImageProcessor::from_file(&p)?)
    } else {
        log::info!(
            "{} has no preprocessor_config.json; using FlavaImageProcessor defaults",
            dir.display()
        );
        Ok(ImageProcessor::default())
    }
}

/// ITM match probabilities of every (image, text) pair: towers once, then the fusion encoder
/// and the ITM head on all n·m pairs. `pixel_values` [n, 3, H, W], `ids`/`mask` [m, L] → `[n][m]`.
pub fn itm_probabilities(
    model: &FlavaModel,
    head: &ItmHead,
    pixel_values: Tensor<4>,
    ids: Tensor<2, Int>,
    mask: Tensor<2, Int>,
) -> Vec<Vec<f32>> {
    let img = model.image_model.forward(pixel_values, None, false, false);
    let txt = model.text_model.forward(ids, Some(&mask), None, false);
    let (n, m) = (img.pre_layernorm.dims()[0], txt.pre_layernorm.dims()[0]);
    let device = mask.device();
    // Pair (i, j) is row i·m + j.
    let pick = |f: &dyn Fn(usize, usize) -> usize| {
        let idx: Vec<i64> = (0..n)
            .flat_map(|i| (0..m).map(move |j| (i, j)))
            .map(|(i, j)| f(i, j) as i64)
            .collect();
        Tensor::<1, Int>::from_data(TensorData::new(idx, [n * m]), &device)
    };
    let (ii, jj) = (pick(&|i, _| i), pick(&|_, j| j));
    let states = |o: &EncoderOutput, idx: Tensor<1, Int>| EncoderOutput {
        last_hidden_state: o.pre_layernorm.clone().select(0, idx.clone()),
        pre_layernorm: o.pre_layernorm.clone().select(0, idx),
        pooler_output: o.pooler_output.clone(),
        hidden_states: None,
    };
    // The ITM head reads the multimodal CLS alone: the fusion's last layer runs at it only.
    let cls = model.fuse_cls(&states(&img, ii), &states(&txt, jj.clone()), Some(&mask.select(0, jj)));
    let p = head
        .match_probability(cls.unsqueeze_dim(1))
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    (0..n).map(|i| p[i * m..(i + 1) * m].to_vec()).collect()
}

/// Computes features (and logits when both modalities are given) with a loaded model; with an
/// ITM head, also the match probability of every pair.
#[allow(clippy::too_many_arguments)]
pub fn embed_with(
    model: &FlavaModel,
    itm_head: Option<&ItmHead>,
    tokenizer: Option<&Tokenizer>,
    processor: &ImageProcessor,
    images: &[PathBuf],
    texts: &[String],
    max_length: usize,
    device: &Device,
) -> anyhow::Result<EmbedOutput> {
    let mut out = EmbedOutput {
        image_features: vec![],
        text_features: vec![],
        logits_per_image: None,
        itm_match_probability: None,
        truncated_texts: vec![],
    };
    let mut img_t = None;
    let mut txt_t = None;
    let mut px_t = None;
    let mut ids_t = None;
    if !images.is_empty() {
        let decoded = images.iter().map(load_image).collect::<Result<Vec<_>, _>>()?;
        let px = processor.pixel_values(&decoded, device);
        px_t = Some(px.clone());
        let f = model.image_features(px);
        out.image_features = rows(f.clone());
        img_t = Some(f);
    }
    if !texts.is_empty() {
        let tok = tokenizer.context("texts were given but the model directory has no tokenizer")?;
        let batch = tok.encode_batch(texts, max_length)?;
        out.truncated_texts = batch
            .truncated
            .iter()
            .enumerate()
            .filter(|(_, t)| **t)
            .map(|(i, _)| i)
            .collect();
        for &i in &out.truncated_texts {
            log::warn!("text {i} is longer than {max_length} tokens and was truncated");
        }
        let (ids, mask, _) = batch.to_tensors(device);
        ids_t = Some((ids.clone(), mask.clone()));
        let f = model.text_features(ids, Some(&mask));
        out.text_features = rows(f.clone());
        txt_t = Some(f);
    }
    if let (Some(i), Some(t)) = (img_t, txt_t) {
        out.logits_per_image = Some(rows(model.contrastive_logits(i, t)));
    }
    if let (Some(head), Some(px), Some((ids, mask))) = (itm_head, px_t, ids_t) {
        out.itm_match_probability = Some(itm_probabilities(model, head, px, ids, mask));
    }
    Ok(out)
}

/// `flava embed`: loads the directory and embeds; `itm` also loads the ITM head and scores every
/// pair (needs images and texts, and a checkpoint with `itm_head.*`).
pub fn run(
    model_dir: &Path,
    images: &[PathBuf],
    texts: &[String],
    max_length: usize,
    itm: bool,
    device: &Device,
) -> anyhow::Result<EmbedOutput> {
    if images.is_empty() && texts.is_empty() {
        anyhow::bail!("nothing to embed: give at least one --image or --text");
    }
    if max_length < 2 {
        anyhow::bail!("--max-length must be at least 2 ([CLS] and [SEP]), got {max_length}");
    }
    if itm && (images.is_empty() || texts.is_empty()) {
        anyhow::bail!("--itm scores image-text pairs: give at least one --image and one --text");
    }
    let model_dir = &crate::hub::resolve(model_dir).context("--model")?;
    let (model, itm_head, config) = if itm {
        let loaded =
            load_pretraining(model_dir, true, device).with_context(|| format!("loading {}", model_dir.display()))?;
        let missing: Vec<&String> = loaded
            .report
            .missing
            .iter()
            .filter(|k| k.starts_with("itm_head."))
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "{}: --itm needs the ITM head, but the checkpoint lacks {} (a FlavaModel checkpoint has no heads; use a FlavaForPreTraining one)",
                model_dir.display(),
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        (loaded.model.flava, Some(loaded.model.itm_head), loaded.config)
    } else {
        let loaded = load_flava_model(model_dir, device).with_context(|| format!("loading {}", model_dir.display()))?;
        if !loaded.report.unexpected.is_empty() {
            log::info!(
                "{} checkpoint tensors not used by FlavaModel (pretraining heads, codebook)",
                loaded.report.unexpected.len()
            );
        }
        (loaded.model, None, loaded.config)
    };
    let max_positions = config.text_config.max_position_embeddings;
    let max_length = if max_length > max_positions {
        log::info!("--max-length {max_length} exceeds the model's {max_positions} positions; using {max_positions}");
        max_positions
    } else {
        max_length
    };
    let tokenizer = if texts.is_empty() {
        None
    } else {
        Some(find_tokenizer(model_dir)?)
    };
    let processor = find_processor(model_dir)?;
    embed_with(
        &model,
        itm_head.as_ref(),
        tokenizer.as_ref(),
        &processor,
        images,
        texts,
        max_length,
        device,
    )
}

/// Human-readable rendering.
pub fn render(out: &EmbedOutput, images: &[PathBuf], texts: &[String]) -> String {
    let mut s = String::new();
    let head = |v: &[f32]| {
        v.iter()
            .take(4)
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (p, f) in images.iter().zip(&out.image_features) {
        s += &format!("image {}: [{}, …] ({} dims)\n", p.display(), head(f), f.len());
    }
    for (t, f) in texts.iter().zip(&out.text_features) {
        s += &format!("text {t:?}: [{}, …] ({} dims)\n", head(f), f.len());
    }
    if let Some(l) = &out.logits_per_image {
        s += "logits_per_image (rows: images, columns: texts):\n";
        for (p, row) in images.iter().zip(l) {
            s += &format!(
                "  {}: {}\n",
                p.display(),
                row.iter().map(|x| format!("{x:8.3}")).collect::<Vec<_>>().join(" ")
            );
        }
    }
    if let Some(l) = &out.itm_match_probability {
        s += "itm_match_probability (rows: images, columns: texts):\n";
        for (p, row) in images.iter().zip(l) {
            s += &format!(
                "  {}: {}\n",
                p.display(),
                row.iter().map(|x| format!("{x:8.4}")).collect::<Vec<_>>().join(" ")
            );
        }
    }
    s
}

/// `flava codebook`: token grids of images (row-major) and the grid side. Preprocessing is the
/// codebook branch of the directory's image processor (Lanczos resize, `0.8·x + 0.1`).
pub fn codebook_tokens(dir: &Path, images: &[PathBuf], device: &Device) -> anyhow::Result<(Vec<Vec<u32>>, usize)> {
    let dir = &crate::hub::resolve(dir).context("--model")?;
    let (codebook, _, _) =
        flava_dvae::load_codebook(dir, device).with_context(|| format!("loading the codebook of {}", dir.display()))?;
    let processor = find_processor(dir)?;
    let decoded = images.iter().map(load_image).collect::<Result<Vec<_>, _>>()?;
    let px = processor.codebook_pixel_values(&decoded, device);
    let t = codebook.tokens(px);
    let [n, hw] = t.dims();
    let v: Vec<i64> = t
        .into_data()
        .convert::<i64>()
        .try_into_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let side = (hw as f64).sqrt().round() as usize;
    Ok((
        (0..n)
            .map(|i| v[i * hw..(i + 1) * hw].iter().map(|&x| x as u32).collect())
            .collect(),
        side,
    ))
}
