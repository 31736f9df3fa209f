//! Loading and saving `FlavaForPreTraining` checkpoints (HF keys: `flava.…`, the five heads,
//! `image_codebook.…`). HF ties each head's `bias` to its `decoder.bias`; files hold either or
//! both (the 2022 `.bin` both, transformers 5 safetensors only `decoder.bias`).

use std::path::Path;

use burn::prelude::*;
use flava_dvae::checkpoint::codebook_from_state_dict;
use flava_dvae::{codebook_state_dict, ImageCodebook};
use flava_fusion::checkpoint::{find_weights, read_config, save_model_dir, CheckpointError};
use flava_fusion::FlavaConfig;
use flava_vit::weights::{load_module, module_state_dict, LoadReport, StateDict, WeightsError};

use crate::pretraining::FlavaForPretraining;

/// Head names whose `bias` is tied to `decoder.bias`.
pub const MASKED_HEADS: [&str; 4] = ["mim_head", "mlm_head", "mmm_image_head", "mmm_text_head"];

/// A pretraining model loaded from a directory.
#[derive(Debug)]
pub struct LoadedPretraining {
    /// The model with its heads.
    pub model: FlavaForPretraining,
    /// The codebook, when the checkpoint holds one (`image_codebook.…`).
    pub codebook: Option<ImageCodebook>,
    /// The configuration.
    pub config: FlavaConfig,
    /// Keys loaded, missing (heads absent from a `FlavaModel` file) and unused.
    pub report: LoadReport,
}

/// Brings a checkpoint to this module's keys: `flava.` for the towers (added to `FlavaModel`
/// files), `X.decoder.bias` from a tied `X.bias` when only that is present; codebook keys dropped.
pub fn pretraining_keys(sd: &StateDict) -> StateDict {
    let model_layout = !sd.has_prefix("flava.");
    let mut out = StateDict {
        tensors: Default::default(),
        ignored: sd.ignored.clone(),
    };
    for (k, v) in &sd.tensors {
        if k.starts_with("image_codebook.") {
            continue;
        }
        let is_head = MASKED_HEADS.iter().any(|h| k.starts_with(&format!("{h}."))) || k.starts_with("itm_head.");
        let key = if model_layout && !is_head {
            format!("flava.{k}")
        } else {
            k.clone()
        };
        out.tensors.insert(key, v.clone());
    }
    for h in MASKED_HEADS {
        let (tied, dec) = (format!("{h}.bias"), format!("{h}.decoder.bias"));
        if let Some(t) = out.tensors.remove(&tied) {
            out.tensors.entry(dec).or_insert(t);
        }
    }
    out
}

/// Builds a model from `config` and loads `sd`. With `allow_missing_heads`, a file without heads
/// (a `FlavaModel` checkpoint, e.g. to initialise pretraining) leaves them randomly initialised;
/// missing tower weights are always an error.
pub fn pretraining_from_state_dict(
    config: &FlavaConfig,
    sd: &StateDict,
    allow_missing_heads: bool,
    device: &Device,
) -> Result<(FlavaForPretraining, Option<ImageCodebook>, LoadReport), CheckpointError> {
    let mut model = FlavaForPretraining::new(config, device);
    let report = load_module(&mut model, &pretraining_keys(sd), true)?;
    let missing_towers: Vec<String> = report
        .missing
        .iter()
        .filter(|k| !allow_missing_heads || k.starts_with("flava."))
        .cloned()
        .collect();
    if !missing_towers.is_empty() {
        return Err(WeightsError::Missing { keys: missing_towers }.into());
    }
    let codebook = if sd.has_prefix("image_codebook.") {
        let (cb, _) = codebook_from_state_dict(&config.image_codebook_config, sd, &device.clone().without_autodiff())
            .map_err(|e| {
            CheckpointError::Weights(WeightsError::Apply {
                key: "image_codebook".into(),
                message: e.to_string(),
            })
        })?;
        Some(cb)
    } else {
        None
    };
    Ok((model, codebook, report))
}

/// Loads an HF directory (`config.json` + `model.safetensors` or `pytorch_model.bin`).
pub fn load_pretraining(
    dir: impl AsRef<Path>,
    allow_missing_heads: bool,
    device: &Device,
) -> Result<LoadedPretraining, CheckpointError> {
    let dir = dir.as_ref();
    let config = read_config(dir)?;
    let sd = StateDict::from_file(find_weights(dir)?)?;
    let (model, codebook, report) = pretraining_from_state_dict(&config, &sd, allow_missing_heads, device)?;
    Ok(LoadedPretraining {
        model,
        codebook,
        config,
        report,
    })
}

/// The model's (and codebook's) weights under HF `FlavaForPreTraining` keys.
pub fn pretraining_state_dict(model: &FlavaForPretraining, codebook: Option<&ImageCodebook>) -> StateDict {
    let mut sd = module_state_dict(model, "", &["flava.logit_scale"]);
    if let Some(cb) = codebook {
        sd.tensors.extend(codebook_state_dict(cb, "image_codebook.").tensors);
    }
    sd
}

/// Writes `config.json` (architecture `FlavaForPreTraining`) and `model.safetensors` into `dir`,
/// which transformers' `FlavaForPreTraining.from_pretrained` loads.
pub fn save_pretraining(
    model: &FlavaForPretraining,
    codebook: Option<&ImageCodebook>,
    config: &FlavaConfig,
    dir: impl AsRef<Path>,
) -> Result<(), CheckpointError> {
    save_model_dir(
        &pretraining_state_dict(model, codebook),
        config,
        "FlavaForPreTraining",
        dir,
    )
}
